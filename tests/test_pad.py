"""ddjax.distill.pad: PAD's parameter selection and its easy-to-hard example schedule.

Tiny nets and N = 2 inner steps, compiled with XLA's fast options (see tests/test_matching.py).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import models
from ddjax.config import load_config
from ddjax.distill import core, datm, matching, pad, registry
from ddjax.errors import DDJaxError

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 3
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
STEP = core.StepConfig(syn_steps=2, expert_epochs=1, max_start_epoch=2, lr_img=10.0, lr_lr=1e-3)
DATM_FIELDS = dict(lr_y=2.0, threshold=10.0)


@functools.cache
def _model():
    return models.get_model("ConvNet", NUM_CLASSES, IMAGE_SHAPE, width=3, depth=1, norm="none")


def _params(seed):
    return models.init_variables(_model(), jax.random.key(seed), IMAGE_SHAPE)["params"]


def _problem():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(6, *IMAGE_SHAPE)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(6, NUM_CLASSES)), jnp.float32)
    start, target = _params(0), _params(1)
    indices, mask = matching.inner_batch_indices(jax.random.key(2), 6, 3, 2)
    return images, logits, start, target, indices, mask


def _flat(params):
    return models.to_flat_vector({"params": params}, _model())


def test_the_mask_covers_the_shallowest_fraction_in_pytorch_order():
    """Weight 0 for exactly the first floor(ratio * P) entries of MTT's flat vector."""
    params = _params(0)
    total = models.count_params(params)
    for ratio in (0.25, 0.5, 0.9):
        flat = _flat(pad.shallow_mask(_model(), params, IMAGE_SHAPE, ratio))
        cut = int(ratio * total)
        np.testing.assert_array_equal(flat[:cut], 0)
        np.testing.assert_array_equal(flat[cut:], 1)
    with pytest.raises(DDJaxError, match="depth_ratio=1.0 must be in"):
        pad.shallow_mask(_model(), params, IMAGE_SHAPE, 1.0)


def test_masked_parameters_give_no_matching_signal():
    """Changing the target in masked entries changes neither the loss nor any gradient;
    changing it in a kept entry does (so the comparison can fail)."""
    images, logits, start, target, indices, mask = _problem()
    weights = pad.shallow_mask(_model(), start, IMAGE_SHAPE, 0.5)
    inner = matching.InnerLoop(_model(), mode="unroll")

    def run(target):
        return matching.match_loss_and_grads(
            images, logits, 0.01, start, target, indices, mask, inner=inner,
            param_weights=weights, label_transform=datm.soft_labels.label_probabilities,
        )  # fmt: skip

    flat_target = _flat(target)
    cut = int(0.5 * flat_target.size)
    noise = np.random.default_rng(3).normal(size=flat_target.size).astype(np.float32)
    shallow = flat_target + np.where(np.arange(flat_target.size) < cut, noise, 0)
    deep = flat_target + np.where(np.arange(flat_target.size) >= cut, noise, 0)
    as_params = functools.partial(models.from_flat_vector, model=_model(), image_shape=IMAGE_SHAPE)
    loss, grads = run(target)
    loss_shallow, grads_shallow = run(as_params(shallow)["params"])
    _, grads_deep = run(as_params(deep)["params"])
    np.testing.assert_allclose(loss_shallow, loss, rtol=1e-6)
    for got, want in zip(grads_shallow, grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert not np.allclose(grads_deep.images, grads.images, rtol=1e-3, atol=1e-8)


def test_masked_loss_is_the_published_formula():
    """L = sum over kept entries of (student - target)^2 / (start - target)^2, as PAD_depth."""
    images, logits, start, target, indices, mask = _problem()
    weights = pad.shallow_mask(_model(), start, IMAGE_SHAPE, 0.5)
    inner = matching.InnerLoop(_model(), mode="unroll")
    probabilities = datm.soft_labels.label_probabilities(logits)
    loss = matching.match_loss(
        images, probabilities, 0.01, start, target, indices, mask, inner=inner,
        param_weights=weights,
    )  # fmt: skip
    student = matching.inner_unroll(images, probabilities, 0.01, start, indices, mask, inner=inner)
    keep = slice(int(0.5 * models.count_params(start)), None)
    s, t, t0 = _flat(student)[keep], _flat(target)[keep], _flat(start)[keep]
    expected = np.sum((s - t) ** 2) / np.sum((t0 - t) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def _trajectories():
    snapshots = [_params(e) for e in range(4)]
    one = jax.tree.map(lambda *s: jnp.stack(s), *snapshots)
    return jax.tree.map(lambda a: jnp.stack([a, a[::-1]]), one)


def _run(method, steps=2):
    images, logits, *_ = _problem()
    state = core.init_state(images, logits, 0.01, jax.random.PRNGKey(0), STEP, method)
    step = core.make_distill_step(
        matching.InnerLoop(_model(), dsa_strategy="crop_flip"), STEP, method, donate=False,
        compiler_options=FAST_COMPILE,
    )  # fmt: skip
    for expert in range(steps):
        state, _ = step(state, _trajectories(), jnp.int32(expert % 2))
    return state


def test_pad_without_a_mask_is_datm_and_with_one_differs():
    datm_state = _run(datm.DATM(**DATM_FIELDS))
    np.testing.assert_array_equal(_run(pad.PAD(**DATM_FIELDS)).images, datm_state.images)
    masked = _run(pad.PAD(**DATM_FIELDS, depth_ratio=0.5))
    assert not np.allclose(masked.images, datm_state.images)
    assert not np.allclose(masked.labels, datm_state.labels)  # labels are learned too


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0, (0.75, True)),
        (10, (0.875, True)),
        (20, (1.0, True)),
        (21, (0.0, False)),
        (40, (0.0, False)),
        (41, (0.1, False)),
        (60, (0.1, False)),
        (61, (0.2, False)),
        (99, (0.2, False)),
    ],
)
def test_example_schedule_follows_buffer_cl(epoch, expected):
    """PAD's published schedule: r0 = 0.75 growing to all by epoch 20, then all, then the
    easiest 10 % dropped after epoch 40 and 20 % after epoch 60."""
    fraction, from_easy = pad.epoch_fraction(epoch, pad.ExampleSchedule())
    assert from_easy == expected[1]
    assert fraction == pytest.approx(expected[0])


def test_example_indices_take_the_easy_end_then_drop_it():
    ranking = [np.arange(0, 10), np.arange(100, 110)]  # each class ranked easiest first
    schedule = pad.ExampleSchedule()
    first = pad.epoch_indices(0, ranking, schedule)
    np.testing.assert_array_equal(first, np.r_[0:7, 100:107])  # floor(0.75 * 10) = 7 easiest
    np.testing.assert_array_equal(pad.epoch_indices(30, ranking, schedule), np.r_[0:10, 100:110])
    np.testing.assert_array_equal(pad.epoch_indices(50, ranking, schedule), np.r_[1:10, 101:110])
    np.testing.assert_array_equal(pad.epoch_indices(70, ranking, schedule), np.r_[2:10, 102:110])
    with pytest.raises(DDJaxError, match="must grow"):
        pad.ExampleSchedule(add_end_epoch=50).validate()


def test_pad_family_is_datm_plus_depth_ratio():
    config = load_config("configs/distill/pad.py:cifar10,ipc=10")
    assert registry.method_class(config) is pad.PAD
    method = pad.PAD.from_config(config, 10)
    assert method.depth_ratio == 0.5 and method.threshold == 1.0 and method.lr_y == 2.0
    assert (config.syn_steps, config.max_start_epoch, config.current_max_start_epoch) == (
        80,
        20,
        10,
    )
    ratios = {ipc: load_config(f"configs/distill/pad.py:cifar10,ipc={ipc}").depth_ratio
              for ipc in (1, 10, 50, 500, 1000)}  # fmt: skip
    assert ratios == {1: 0.0, 10: 0.5, 50: 0.25, 500: 0.5, 1000: 0.5}
    bad = load_config("configs/distill/pad.py:cifar10,ipc=10", ["depth_ratio=1.5"])
    with pytest.raises(DDJaxError, match="depth_ratio=1.5 must be in"):
        pad.PAD.check_config(bad)


# --------------------------------------------------------------------------------------------
# Experts on PAD's schedule
# --------------------------------------------------------------------------------------------

DATA = "synthetic:classes=3,size=8,channels=1,train=24,test=12,seed=1"  # 72 train images
N_TRAIN = 72


def _experts(out, **kwargs):
    from ddjax import data, experts

    dataset = data.load_dataset(DATA)
    settings = dict(model="ConvNetW8", num_experts=1, epochs=2, batch_size=8, test_every=2)
    experts.train_experts(dataset, out_dir=out, progress=False, **settings, **kwargs)
    return experts.load_trajectory(out, 0), np.load(out / "forgetting.npz")


def test_experts_train_on_the_scheduled_examples_only(tmp_path):
    plain, _ = _experts(tmp_path / "plain")
    # Every example, in train order: the same batches as no schedule, bit for bit.
    same, _ = _experts(
        tmp_path / "all", epoch_subset=lambda e: np.arange(N_TRAIN), example_schedule={"n": 72}
    )
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(a, b)
    # The first 36 examples only: the others are never presented, so never learned, and
    # the trajectory differs.
    half, forgetting = _experts(
        tmp_path / "half", epoch_subset=lambda e: np.arange(36), example_schedule={"n": 36}
    )
    assert not np.array_equal(jax.tree.leaves(half)[0], jax.tree.leaves(plain)[0])
    assert not forgetting["learned"][0, 36:].any()
    np.testing.assert_array_equal(forgetting["counts"][0, 36:], 2)  # never learned: = epochs
    meta = json.loads((tmp_path / "half" / "experts.json").read_text())
    assert meta["example_schedule"] == {"n": 36}
    with pytest.raises(DDJaxError, match="example_schedule=None; this run has"):
        _experts(tmp_path / "plain", epoch_subset=lambda e: np.arange(36),
                 example_schedule={"n": 36})  # fmt: skip


def test_the_experts_stage_builds_pads_schedule_from_scores(tmp_path):
    from ddjax import data
    from ddjax.config import load_config
    from ddjax.experts import stage

    dataset = data.load_dataset(DATA)
    scores = np.arange(N_TRAIN, dtype=np.float32)  # higher = harder: index order is easiest first
    np.save(tmp_path / "scores.npy", scores)
    section = load_config(
        "configs/experts/mtt.py:digits",
        ["example_schedule.name=pad", f"example_schedule.scores={tmp_path / 'scores.npy'}"],
    ).example_schedule
    subset, description = stage.example_schedule(section, dataset)
    ranking = [np.flatnonzero(dataset.y_train == c) for c in range(3)]  # easiest first
    for epoch in (0, 10, 30, 50, 70):
        np.testing.assert_array_equal(
            subset(epoch), pad.epoch_indices(epoch, ranking, pad.ExampleSchedule())
        )
    assert description["name"] == "pad" and description["init_ratio"] == 0.75
    off = load_config("configs/experts/mtt.py:digits").example_schedule
    assert stage.example_schedule(off, dataset) == (None, None)
    with pytest.raises(DDJaxError, match="example_schedule.name='cl'"):
        stage.example_schedule(load_config("configs/experts/mtt.py:digits",
                                           ["example_schedule.name=cl"]).example_schedule,
                               dataset)  # fmt: skip


def test_cli_refuses_a_schedule_without_scores_before_any_work(tmp_path, capsys):
    from ddjax import cli

    args = ["experts", "--config", "configs/experts/mtt.py:digits",
            "--workdir", str(tmp_path / "w"), "--config.example_schedule.name=pad"]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddjax: error:") and "scores is empty" in err and "\n" not in err
    assert not (tmp_path / "w").exists()
