"""Non-finite injections: every optimising stage under the one guard (:mod:`ddjax.guard`).

What a user relies on: an update that would make the state non-finite is skipped (the old
state kept, the skip logged with its position); a stage that cannot make progress stops
with one line and exit 2; nothing non-finite is ever written (sets, teachers, JSON); a
non-finite teacher is refused before any work directory exists. Each stage runs on the
tiny generated dataset of ``tests/faults.py`` with a tiny model, for 1-3 updates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from faults import DATA, refused, run

from ddjax import checkpoint, data, guard, loop, models, train
from ddjax.errors import DDJaxError
from ddjax.synset import SyntheticSet
from ddjax.workdir import Workdir

NUM_CLASSES, IMAGE_SHAPE = 3, (8, 8, 1)
#: float32-finite, but one SGD step with it overflows every network here.
HUGE_LR = 1e30
#: XLA options that compile the distill step fast (as tests/test_distill.py).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _strict(text: str):
    """``json.loads`` that refuses NaN/Infinity tokens (strict JSON)."""

    def refuse(token):
        raise AssertionError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _records(work: Path, event: str) -> list[dict]:
    lines = (work / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(_strict, lines) if r["event"] == event]


def _check_outputs(work: Path) -> None:
    """Every JSON file of ``work`` is strict JSON and every saved array is finite."""
    for path in work.rglob("*"):
        if path.suffix == ".json":
            _strict(path.read_text())
        elif path.suffix == ".npz":
            with np.load(path) as f:
                for name in f.files:
                    if np.issubdtype(f[name].dtype, np.inexact):
                        assert np.isfinite(f[name]).all(), f"{path}:{name}"
        elif path.suffix == ".npy":
            array = np.load(path)
            assert not np.issubdtype(array.dtype, np.inexact) or np.isfinite(array).all(), path


def _stopped(argv, capsys, stage: str) -> tuple[Path, str]:
    """Runs ``ddjax ARGV``; asserts exit 2 with the one no-progress line and finite outputs.

    Returns the work directory and the error line.
    """
    code, out, err = run(argv, capsys)
    lines = err.splitlines()
    assert code == 2 and "Traceback" not in err + out, err
    assert len(lines) == 1 and lines[0].startswith(f"ddjax: error: {stage} cannot make progress")
    work = Path(argv[argv.index("--workdir") + 1])
    _check_outputs(work)
    return work, lines[0]


# --------------------------------------------------------------------------------------------
# The guard itself
# --------------------------------------------------------------------------------------------


def test_guard_keeps_the_old_tree_and_counts_consecutive_skips():
    old = {"w": jnp.arange(3.0), "n": jnp.int32(4)}
    good = {"w": jnp.arange(3.0) + 1, "n": jnp.int32(5)}
    bad = {"w": jnp.array([1.0, jnp.inf, 2.0]), "n": jnp.int32(5)}
    kept, accepted = guard.guard(good, old, loss=jnp.float32(1.0))
    assert bool(accepted) and jax.tree.all(jax.tree.map(jnp.array_equal, kept, good))
    for new, loss in ((bad, 1.0), (good, jnp.nan)):
        kept, accepted = guard.guard(new, old, loss=jnp.float32(loss))
        assert not bool(accepted) and jax.tree.all(jax.tree.map(jnp.array_equal, kept, old))
    skips = guard.no_skips()
    for accepted in (False, False, True, False):
        skips = guard.count(skips, jnp.bool_(accepted))
    assert (int(skips.total), int(skips.streak)) == (3, 1)
    assert guard.finite_or_none(np.float32([1.5, np.nan, np.inf])) == [1.5, None, None]


class _TinyBN(nn.Module):
    """Dense -> BatchNorm -> Dense: parameters, running statistics, fast to compile."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(4)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(NUM_CLASSES)(nn.relu(x))


def test_train_step_skips_one_bad_step_and_good_steps_are_unchanged_bit_for_bit():
    net = _TinyBN()
    tx = train.sgd(0.1, momentum=0.9, weight_decay=5e-4)
    step = jax.jit(train.make_train_step(net, tx))
    images = jax.random.normal(jax.random.key(1), (6, *IMAGE_SHAPE))
    labels = jnp.arange(6) % NUM_CLASSES
    key = jax.random.key(2)
    start = jax.jit(lambda key: train.init_state(net, tx, key, IMAGE_SHAPE))(jax.random.key(0))
    first, _ = step(start, images, labels, key)
    # A NaN pixel makes the loss and every gradient NaN: the step is skipped, state kept.
    poisoned = images.at[0, 0, 0, 0].set(jnp.nan)
    after_bad, loss = step(first, poisoned, labels, key)
    assert not math.isfinite(float(loss))
    same = jax.tree.map(np.array_equal, after_bad[:3], first[:3])
    assert all(jax.tree.leaves(same))
    assert (int(after_bad.skips.total), int(after_bad.skips.streak)) == (1, 1)
    # The next good step is the one the run without the bad batch takes, bit for bit.
    guarded, _ = step(after_bad, images, labels, key)
    plain, _ = step(first, images, labels, key)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, guarded[:3], plain[:3])))
    assert (int(guarded.skips.total), int(guarded.skips.streak)) == (1, 0)


def test_json_writers_are_strict(tmp_path):
    with pytest.raises(ValueError, match="JSON compliant"):
        loop.atomic_write_json(tmp_path / "r.json", {"loss": float("nan")})
    assert not (tmp_path / "r.json").exists()
    import ml_collections

    work = Workdir(tmp_path / "w", ml_collections.ConfigDict({"a": 1}), "test")
    with pytest.raises(ValueError, match="JSON compliant"):
        work.log(event="step", loss=float("inf"))
    work.log(event="step", loss=guard.finite_or_none(float("inf")))
    assert _records(work.path, "step")[0]["loss"] is None


def test_non_finite_sets_and_teachers_are_never_written(tmp_path):
    from ddjax.sre2l import teacher

    images = np.zeros((3, *IMAGE_SHAPE), np.float32)
    images[1, 2, 3, 0] = np.nan
    with pytest.raises(DDJaxError, match=r"non-finite values \(NaN or inf, in images\)"):
        SyntheticSet(images, np.arange(3), NUM_CLASSES).save(tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()
    model, variables = _bn_teacher()
    variables["batch_stats"] = jax.tree.map(lambda x: x * jnp.inf, variables["batch_stats"])
    with pytest.raises(DDJaxError, match="non-finite values .* in batch_stats/"):
        teacher.save_teacher(
            tmp_path / "t",
            model_name="ConvNetBN",
            model_overrides=TEACHER,
            variables=variables,
            dataset=data.load_dataset(DATA),
        )
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------------------------
# Distill: the lr_img that is inf in float32; a run whose every update is skipped
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    """tests/test_distill.py's experts (the same programs: compiled once in the suite)."""
    from ddjax import experts

    out = tmp_path_factory.mktemp("experts")
    experts.train_experts(
        data.load_dataset(DATA),
        out_dir=out,
        model="ConvNetW8",
        num_experts=3,
        epochs=3,
        experts_at_once=3,
        test_every=3,
        progress=False,
    )
    return out


def test_distill_whose_updated_images_are_never_finite_stops(experts_dir, tmp_path, monkeypatch):
    """The issue's ``lr_img=1e39``: a finite float64 that is inf in float32. The loss and the
    gradients are finite, the *updated* images are not: every update is skipped (the images
    stay the last good ones) and the run stops instead of saving NaNs."""
    import optax

    from ddjax.config import import_config
    from ddjax.distill import core
    from ddjax.distill.run import run_distill

    # Past the config checks (which refuse 1e39 as a value), the image optimiser is the one
    # such a learning rate makes: SGD with a float32 rate of inf.
    make = core.make_optimizers
    monkeypatch.setattr(
        core,
        "make_optimizers",
        lambda lr_img, lr_lr, momentum: (
            (optax.sgd(jnp.float32(jnp.inf), momentum=momentum),)
            + make(lr_img, lr_lr, momentum)[1:]
        ),
    )
    # tests/test_distill.py's run (its evaluation at iteration 0 is the same program).
    config = import_config("distill/mtt.py").mtt_fields(
        DATA, ipc=2, syn_steps=1, expert_epochs=1, max_start_epoch=2, lr_img=10.0, lr_lr=1e-3,
        lr_teacher=0.01, model="ConvNetW8", iterations=2, eval_every=4, eval_epochs=2,
        num_eval=1,
    )  # fmt: skip
    config.experts_dir = str(experts_dir)
    config.experts_in_memory = 2
    config.dsa_strategy = "crop_flip"
    work = tmp_path / "run"
    message = "distill cannot make progress: all 2 updates up to iteration 2 were skipped"
    with pytest.raises(DDJaxError, match=message):
        run_distill(config, str(work), progress=False, compiler_options=FAST_COMPILE)
    skipped = _records(work, "skipped")
    assert [(r["iteration"], r["count"]) for r in skipped] == [(1, 1), (2, 1)]
    assert all(math.isfinite(r["loss"]) for r in skipped)  # the loss was fine: the state not
    _check_outputs(work)
    with np.load(work / "synset.npz") as f:  # written at iteration 0: the last good state
        assert np.isfinite(f["images"]).all()


# --------------------------------------------------------------------------------------------
# Epoch-driven stages: a huge learning rate, every update skipped, exit 2
# --------------------------------------------------------------------------------------------

# The data, networks and settings of tests/test_squeeze.py and tests/test_experts.py: the
# learning rate is injected (not compiled in), so these runs reuse those tests' programs.
SPEC = "synthetic:classes=3,size=8,channels=1,train=16,test=8"
EXPERTS = [
    "experts",
    "--config=configs/experts/mtt.py:digits",
    f"--config.dataset.name={SPEC}",
    "--config.model=ConvNetW8",
    "--config.num_experts=1",
    "--config.epochs=3",
    "--config.batch_size=16",
]


def test_a_diverging_squeeze_stops_without_saving_a_teacher(tmp_path):
    from ddjax.config import import_config
    from ddjax.sre2l import squeeze

    config = import_config("squeeze/sre2l.py").squeeze_fields(
        SPEC, model="ConvNetBN", width=8, epochs=3, batch_size=16, augment="crop_flip",
        lr=HUGE_LR,
    )  # fmt: skip
    work = tmp_path / "run"
    with pytest.raises(DDJaxError, match="squeeze cannot make progress: all 3 updates") as e:
        squeeze.run_squeeze(config, work, progress=False)
    assert "\n" not in str(e.value) and str(work / "checkpoints") in str(e.value)
    # The first update may still be finite (huge weights); the ones after it are not.
    skipped = _records(work, "skipped")
    assert skipped and {r["reason"] for r in skipped} == {guard.REASON}
    assert f"updates of epoch {skipped[-1]['epoch']} were skipped" in str(e.value)
    assert not (work / "teacher").exists() and not (work / "results.json").exists()
    _check_outputs(work)


def test_diverging_experts_stop_with_one_line(tmp_path, capsys):
    work, line = _stopped(
        [*EXPERTS, f"--config.lr={HUGE_LR}", "--workdir", str(tmp_path / "run")],
        capsys,
        "experts 0",
    )
    skipped = _records(work, "skipped")
    assert skipped[-1]["experts"] == [0] and skipped[-1]["count"] == [3]
    assert f"all 3 updates of epoch {skipped[-1]['epoch']} were skipped" in line
    assert not (work / "expert_0000").exists() and not (work / "results.json").exists()


def test_evaluation_that_diverges_stops_with_one_line(tmp_path, capsys):
    dataset = data.load_dataset(DATA)
    synset = tmp_path / "set.npz"
    SyntheticSet(dataset.x_train[:6], dataset.y_train[:6], NUM_CLASSES).save(synset)
    argv = [
        "evaluate",
        "--config=configs/evaluate/digits.py",
        f"--config.dataset.name={DATA}",
        f"--config.synset={synset}",
        "--config.eval.models=ConvNetD1",
        "--config.eval.protocol=dc",
        "--config.eval.num_models=1",
        "--config.eval.epochs=2",
        f"--config.eval.lr={HUGE_LR}",
        "--workdir",
        str(tmp_path / "run"),
    ]
    work, _ = _stopped(argv, capsys, "evaluation of ConvNetD1")
    assert [r["count"] for r in _records(work, "skipped")][-1] == [1]


def test_kd_students_with_a_nan_loss_stop(monkeypatch):
    from ddjax.sre2l import kd

    model, variables = _bn_teacher()
    from ddjax.sre2l.teacher import Teacher

    dataset = data.load_dataset(DATA)
    synset = SyntheticSet(dataset.x_train[:4], dataset.y_train[:4], NUM_CLASSES)
    teacher = Teacher(model, variables, {})
    monkeypatch.setattr(kd, "kd_loss", lambda logits, targets, **_: jnp.nan * logits.sum())
    logged = []
    with pytest.raises(DDJaxError, match="KD students cannot make progress: all 1 updates"):
        kd.evaluate_kd(
            synset, dataset, teacher, recipe="cifar", model="ConvNetD1", num_models=1,
            epochs=2, batch_size=4, log=lambda **r: logged.append(r), lr=0.0123,
        )  # fmt: skip
    assert [(r["event"], r["epoch"], r["count"]) for r in logged] == [("skipped", 1, 1)]


# --------------------------------------------------------------------------------------------
# Recover: one NaN step is skipped and logged; all NaN stops
# --------------------------------------------------------------------------------------------

TEACHER = {"width": 4, "depth": 1}


def _bn_teacher():
    model = models.get_model("ConvNetBN", NUM_CLASSES, IMAGE_SHAPE, **TEACHER)
    return model, dict(models.init_variables(model, jax.random.key(0), IMAGE_SHAPE))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A good teacher and one whose running variance holds a NaN (written behind the guard)."""
    from ddjax.sre2l import teacher

    root = tmp_path_factory.mktemp("teachers")
    _, variables = _bn_teacher()
    dataset = data.load_dataset(DATA)
    for name in ("good", "nan"):
        teacher.save_teacher(
            root / name,
            model_name="ConvNetBN",
            model_overrides=TEACHER,
            variables=variables,
            dataset=dataset,
        )
    stats = variables["batch_stats"]
    first = jax.tree_util.tree_leaves_with_path(stats)[0][0]
    poisoned = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[0].set(jnp.nan) if path == first else x, stats
    )
    checkpoint.save_tree(
        root / "nan" / teacher.VARIABLES_DIR, {**variables, "batch_stats": poisoned}
    )
    return root / "good", root / "nan"


def _recover(teacher_dir, work):
    """Three batches of two images, one class each (class-wise batching)."""
    return [
        "recover",
        "--config=configs/recover/sre2l.py:digits",
        f"--config.dataset.name={DATA}",
        f"--config.teacher={teacher_dir}",
        "--config.ipc=2",
        "--config.batch_size=2",
        "--config.batching=class_wise",
        "--config.iterations=3",
        "--config.log_every=2",
        "--config.crop=False",
        "--config.flip=False",
        "--workdir",
        str(work),
    ]


def test_recover_skips_nan_updates_and_stops_a_batch_without_progress(
    teachers, tmp_path, capsys, monkeypatch
):
    """Iteration 2 of every batch has a NaN learning rate (skipped, logged, the batch goes on);
    the class-2 batch's loss is always NaN: that batch stops the run, the others are kept."""
    from ddjax.sre2l import recover_step

    cosine, objective = recover_step.cosine_lr, recover_step.recover_loss

    def nan_at_second_iteration(step, iterations, lr):
        return jnp.where(step == 1, jnp.nan, cosine(step, iterations, lr))

    def nan_for_class_2(model, variables, images, labels, **kwargs):
        loss, parts = objective(model, variables, images, labels, **kwargs)
        return jnp.where(labels[0] == 2, jnp.nan, loss), parts

    monkeypatch.setattr(recover_step, "cosine_lr", nan_at_second_iteration)
    monkeypatch.setattr(recover_step, "recover_loss", nan_for_class_2)
    work, line = _stopped(_recover(teachers[0], tmp_path / "run"), capsys, "recover")
    assert "all 3 updates of the batch were skipped" in line
    skipped = [(r["batch"], r["iteration"], r["count"]) for r in _records(work, "skipped")]
    assert skipped == [(0, 2, 1), (1, 2, 1), (2, 2, 2), (2, 3, 1)]
    assert [r["batch"] for r in _records(work, "batch")] == [0, 1]  # finished, finite, kept
    assert sorted(_strict((work / "results.json").read_text())["batches"]) == ["0", "1"]


# --------------------------------------------------------------------------------------------
# A non-finite teacher is refused before any work directory exists
# --------------------------------------------------------------------------------------------


def test_a_non_finite_teacher_is_refused_by_every_stage_that_reads_one(teachers, tmp_path, capsys):
    dataset = data.load_dataset(DATA)
    synset = tmp_path / "set.npz"
    SyntheticSet(dataset.x_train[:3], dataset.y_train[:3], NUM_CLASSES).save(synset)
    bad = teachers[1]
    message = f"teacher {bad} has non-finite values (NaN or inf, in batch_stats/"
    cases = [
        _recover(bad, tmp_path / "recover"),
        [
            "relabel",
            "--config=configs/relabel/sre2l.py:digits",
            f"--config.dataset.name={DATA}",
            f"--config.synset={synset}",
            f"--config.teacher={bad}",
            "--workdir",
            str(tmp_path / "relabel"),
        ],
        [
            "evaluate",
            "--config=configs/evaluate/digits.py",
            f"--config.dataset.name={DATA}",
            f"--config.synset={synset}",
            f"--config.kd.teacher={bad}",
            "--workdir",
            str(tmp_path / "evaluate"),
        ],
    ]
    for argv in cases:
        refused(argv, capsys, message, watch=[bad])
