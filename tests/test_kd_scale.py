"""KD students at ImageNet scale: gradient accumulation, top-5, tests every k epochs, resume,
one student data parallel over devices.

Tiny shapes (8-px images, 10 classes, ConvNets of width 8): what is checked is the arithmetic
of the mechanisms, which does not depend on the size. Equalities that run several optimiser
steps are checked in float64, where reordering a sum changes the last of ~16 digits, so a
tolerance of 1e-9 is machine independent (AVX2 or AVX-512) and still catches any real
difference (a dropped example, a per-micro-batch mean, per-device BatchNorm statistics).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ddjax import data, models, train
from ddjax.config import import_config
from ddjax.errors import DDJaxError
from ddjax.evaluate import pool_test_scores
from ddjax.evaluate_stage import KDTrainer
from ddjax.sre2l import kd, relabel
from ddjax.sre2l.teacher import save_teacher
from ddjax.synset import SyntheticSet
from ddjax.workdir import Workdir

IMAGE_SHAPE = (8, 8, 3)
CLASSES = 10
DATASET = f"synthetic:classes={CLASSES},size=8,train=1,test=3"


def _student(norm: str):
    return models.get_model("ConvNet", CLASSES, IMAGE_SHAPE, width=8, depth=2, norm=norm)


def _kd_batch(size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(size, *IMAGE_SHAPE)).astype(np.float32)
    return images, (3 * rng.normal(size=(size, CLASSES))).astype(np.float32)


def _max_relative(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)) / (np.abs(np.asarray(y)) + 1e-12)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# --------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------


def test_micro_batches_cover_the_batch():
    assert train.micro_batch_sizes(1024, 4) == [256] * 4
    assert train.micro_batch_sizes(10, 4) == [3, 3, 3, 1]  # the rest: one smaller micro-batch
    assert train.micro_batch_sizes(9, 4) == [3, 3, 3]  # never more than A, never above ceil(B/A)
    assert train.micro_batch_sizes(848, 4) == [212] * 4  # ImageNet's last batch at IPC 50
    for batch, accumulate in [(7, 3), (5, 5), (1, 2), (13, 4)]:
        sizes = train.micro_batch_sizes(batch, accumulate)
        assert sum(sizes) == batch and len(sizes) <= accumulate
        assert max(sizes) == -(-batch // accumulate)
    with pytest.raises(DDJaxError, match="accumulate=0 must be a positive integer"):
        train.make_train_step(
            _student("none"), kd.get_recipe("imagenet").make_optimizer(), accumulate=0
        )


def test_accumulated_step_equals_the_whole_batch_in_float64():
    """KD's loss is a batch mean, so summing micro-batch gradients weighted by size / B gives
    the whole batch's update: AdamW, 3 steps, a batch of 10 cut into 3 + 3 + 3 + 1 (a scan over
    the full micro-batches and the uneven rest). Measured: 1e-13 relative in float64."""
    net = _student("none")  # no BatchNorm: micro-batches cannot differ from the batch
    recipe = kd.get_recipe("imagenet", lr=0.01, temperature=4.0)
    tx = recipe.make_optimizer()
    loss_fn = lambda s, t: kd.kd_loss(s, t, recipe.temperature, t_squared=False)
    images, logits = _kd_batch(10)
    with jax.enable_x64(True):
        start = train.init_state(net, tx, jax.random.key(0, impl="rbg"), IMAGE_SHAPE, jnp.float64)
        assert jax.tree.leaves(start.params)[0].dtype == jnp.float64
        runs = {}
        for accumulate in (1, 4):
            step = jax.jit(train.make_train_step(net, tx, None, loss_fn, True, accumulate))
            state, history = start, []
            for i in range(3):
                state, (loss, correct) = step(state, images, logits + i, jax.random.key(1))
                history.append((float(loss), np.asarray(correct)))
            assert step._cache_size() == 1  # one compiled step
            runs[accumulate] = state, history
    (whole, whole_history), (state, history) = runs[1], runs[4]
    assert _max_relative(state.params, whole.params) < 1e-9
    for (loss, correct), (whole_loss, whole_correct) in zip(history, whole_history, strict=True):
        assert loss == pytest.approx(whole_loss, rel=1e-12)  # the batch's mean loss
        np.testing.assert_array_equal(correct, whole_correct)  # in the batch's order


def test_batchnorm_micro_batches_normalise_with_their_own_statistics():
    """As PyTorch's accumulation: each micro-batch's forward uses its statistics, and the
    running statistics are updated once per micro-batch, in turn."""
    net = _student("batch")
    tx = kd.get_recipe("imagenet").make_optimizer()
    loss_fn = lambda s, t: kd.kd_loss(s, t, 20.0, t_squared=False)
    start = train.init_state(net, tx, jax.random.key(0, impl="rbg"), IMAGE_SHAPE)
    images, logits = _kd_batch(8, seed=1)
    step = jax.jit(train.make_train_step(net, tx, None, loss_fn, accumulate=2))
    state, loss = step(start, images, logits, jax.random.key(0))
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))

    apply = jax.jit(
        lambda variables, x: net.apply(variables, x, train=True, mutable=["batch_stats"])[1]
    )
    stats = start.batch_stats
    for micro in (images[0::2], images[1::2]):  # micro-batch j: examples j, j + 2, ... (strided)
        stats = apply({"params": start.params, "batch_stats": stats}, micro)["batch_stats"]
    for ours, expected in zip(
        jax.tree.leaves(state.batch_stats), jax.tree.leaves(stats), strict=True
    ):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_recipe_and_config_fields_are_checked():
    assert kd.get_recipe("imagenet").accumulate == 1
    assert kd.get_recipe("imagenet", accumulate=4).accumulate == 4
    with pytest.raises(DDJaxError, match="recipe accumulate=0 must be a positive integer"):
        kd.get_recipe("imagenet", accumulate=0)
    with pytest.raises(DDJaxError, match="accumulate=9 must be at most batch_size=8"):
        kd.get_recipe("imagenet", batch_size=8, accumulate=9)
    with pytest.raises(DDJaxError, match=r"eval_every=-1 must be an integer >= 0"):
        KDTrainer(None, kd.get_recipe("imagenet"), None, 0, eval_every=-1)
    with pytest.raises(DDJaxError, match=r"checkpoint_every=0 must be an integer >= 1"):
        KDTrainer(None, kd.get_recipe("imagenet"), None, 0, checkpoint_every=0)
    config = import_config("relabel/sre2l.py").get_config("imagenet")
    assert config.recipe.accumulate == 1 and config.eval.eval_every == 0
    assert config.eval.checkpoint_every == 1


# --------------------------------------------------------------------------------------------
# Top-5
# --------------------------------------------------------------------------------------------


def test_top5_is_the_true_class_among_the_five_largest_logits():
    dataset = data.load_dataset(DATASET)  # 30 test images, 10 classes
    net = _student("batch")
    tx = kd.get_recipe("imagenet").make_optimizer()
    pool = train.init_pool(net, tx, jax.random.key(3, impl="rbg"), IMAGE_SHAPE, 2)
    apply = jax.jit(lambda variables, x: net.apply(variables, x, train=False))
    hits = []
    for i in range(2):
        one = jax.tree.map(lambda x, i=i: x[i], pool)
        variables = {"params": one.params, "batch_stats": one.batch_stats}
        logits = np.asarray(apply(variables, dataset.x_test))
        best = np.argsort(-logits, axis=1)[:, :5]
        hits.append(np.any(best == dataset.y_test[:, None], axis=1))
        top1 = np.mean(np.argmax(logits, 1) == dataset.y_test)
        assert top1 < np.mean(hits[-1]) < 1  # a check that can fail
    hits = np.stack(hits)
    for pool_mode in ("vmap", "loop"):
        scores = pool_test_scores(net, pool, dataset, pool_mode=pool_mode, batch_size=15, top5=True)
        np.testing.assert_allclose(scores.top_k, hits.mean(1), rtol=1e-6)
    # A label of -1 (a stream's padding) is not counted: the last 5 images are padding here.
    padding = np.where(np.arange(15) < 10, dataset.y_test[15:], -1)

    def chunks():
        return [(dataset.x_test[:15], dataset.y_test[:15]), (dataset.x_test[15:], padding)]

    padded = train.scores_over(net, pool, chunks, CLASSES, "vmap", 5)
    np.testing.assert_allclose(padded.top_k, hits[:, :25].mean(1), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Tests every k epochs and resume, through `ddjax relabel`
# --------------------------------------------------------------------------------------------


class Killed(Exception):
    pass


def _relabel_config(tmp_path):
    dataset = data.load_dataset(DATASET)
    net = models.get_model("ConvNet", CLASSES, IMAGE_SHAPE, width=8, depth=2, norm="batch")
    teacher = models.init_variables(net, jax.random.key(5, impl="rbg"), IMAGE_SHAPE)
    save_teacher(
        tmp_path / "teacher", model_name="ConvNetBN", model_overrides={"width": 8, "depth": 2},
        variables=teacher, dataset=dataset,
    )  # fmt: skip
    synset = SyntheticSet(dataset.x_train, dataset.y_train, CLASSES)  # 10 images
    config = import_config("relabel/sre2l.py").relabel_fields(
        DATASET, "imagenet", models=("ConvNet",), model_overrides={"width": 8, "depth": 2},
        epochs=3, batch_size=5,
    )  # fmt: skip
    config.synset = str(synset.save(tmp_path / "synset.npz"))
    config.teacher = str(tmp_path / "teacher")
    config.eval.num_models = 1
    config.eval.eval_every = 2
    return config


def test_students_are_tested_every_k_epochs_and_a_killed_run_resumes(tmp_path, monkeypatch):
    """eval_every=2 over 3 epochs tests after epochs 2 and 3 (the end); a run killed in epoch 2
    (after the checkpoint of epoch 1) resumes there and ends as the uninterrupted run."""
    config = _relabel_config(tmp_path)
    whole = relabel.run_relabel(config, str(tmp_path / "whole"), progress=False)
    result = whole["eval"]["ConvNet"]
    assert sorted(result["by_epoch"]) == ["2", "3"]
    assert result["by_epoch"]["3"] == {"top1": result["accuracies"], "top5": result["top5"]}
    assert len(result["top5"]) == 1 and result["top5_mean"] >= result["mean"]
    logged = [
        json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    ]
    tests = [(e["epoch"], e["top1"], e["top5"]) for e in logged if e["event"] == "kd_eval"]
    assert [epoch for epoch, _, _ in tests] == [2, 3]
    assert tests[1][1:] == (result["mean"], result["top5_mean"])
    assert (tmp_path / "whole" / "students" / "ConvNet").is_dir()

    log = Workdir.log

    def killing_log(self, **record):
        if record.get("event") == "kd_eval":
            raise Killed  # in epoch 2's test: the checkpoint of epoch 1 is on disk
        log(self, **record)

    monkeypatch.setattr(Workdir, "log", killing_log)
    with pytest.raises(Killed):
        relabel.run_relabel(config, str(tmp_path / "killed"), progress=False)
    students = tmp_path / "killed" / "students" / "ConvNet"
    assert sorted(int(p.name) for p in students.iterdir() if p.name.isdigit()) == [1]
    monkeypatch.setattr(Workdir, "log", log)
    resumed = relabel.run_relabel(config, str(tmp_path / "killed"), progress=False)
    again = resumed["eval"]["ConvNet"]
    for key in ("accuracies", "top5", "by_epoch", "final_train_loss", "per_class_mean"):
        assert again[key] == result[key], key  # bit-identical on CPU


# --------------------------------------------------------------------------------------------
# One student, data parallel
# --------------------------------------------------------------------------------------------


def _data_parallel_student(out=None):
    """One BatchNorm student, 2 epochs of 3 batches (16, 16 and an uneven 12) in 2 micro-batches.

    Trained data parallel over every device (8 in the subprocess: the batches of 16 are split,
    the last one replicated); returns the parameters, statistics, losses and test scores.
    """
    images, logits = _kd_batch(44, seed=2)
    order = [np.arange(0, 16), np.arange(16, 32), np.arange(32, 44)]

    def batches(epoch):
        for index in order:
            yield jnp.asarray(images[index] + 0.1 * epoch), jnp.asarray(logits[index] - epoch)

    recipe = kd.get_recipe("imagenet", epochs=2, batch_size=16, accumulate=2, lr=0.01)
    net = _student("batch")
    mesh = kd.data_mesh(16)
    assert mesh.shape["data"] == jax.device_count()
    if jax.device_count() > 1:  # split where 8 divides the batch, else replicated
        placed = [
            views.sharding.spec for views, _, _ in kd.ViewSource(batches, mesh).epoch_batches(0)
        ]
        assert placed == [P("data"), P("data"), P()]
    state, losses = kd.train_kd(net, recipe, batches, image_shape=IMAGE_SHAPE, num_models=1)
    assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == jax.device_count()
    dataset = data.load_dataset(DATASET)
    scores = pool_test_scores(net, state, dataset, pool_mode="vmap", top5=True)
    flat = {
        "params": np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)]),
        "stats": np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.batch_stats)]),
        "losses": losses,
        "scores": np.stack([scores.accuracy, scores.top_k]),
    }
    if out is not None:
        np.savez(out, **flat)
    return flat


def test_one_student_on_eight_devices_equals_one_device(tmp_path):
    """The batch (views and teacher logits) split over 8 forced host devices, the student
    replicated: loss, gradients and BatchNorm statistics stay whole-batch ones. Measured in
    float64: 4e-13 apart (float32 reordering, amplified by AdamW, would give 3e-4)."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jax, test_kd_scale
        assert jax.device_count() == 8
        with jax.enable_x64(True):
            test_kd_scale._data_parallel_student({str(tmp_path / "eight.npz")!r})
        """
    )
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    # The 8-device run and this process's 1-device run side by side.
    eight = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True
    )
    with jax.enable_x64(True):
        one = _data_parallel_student()  # this process has one device
    _, stderr = eight.communicate(timeout=300)
    assert eight.returncode == 0, stderr[-2000:]
    assert one["params"].dtype == np.float64
    with np.load(tmp_path / "eight.npz") as eight:
        for key in ("params", "stats"):
            np.testing.assert_allclose(eight[key], one[key], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-12)
        np.testing.assert_array_equal(eight["scores"], one["scores"])
