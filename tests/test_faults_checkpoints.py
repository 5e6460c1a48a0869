"""Fault matrix: damaged checkpoints are one line, and resumed runs log every event once.

Each checkpoint a stage reads -- an expert trajectory (distill), a teacher's variables
(recover), a stage's own resume state (squeeze's numbered checkpoints, recover's
``inflight.npz``) -- is damaged in each way a disk or a kill damages files: a data file
missing, truncated or bit-flipped, its metadata JSON overwritten, part of the directory
deleted. The CLI must refuse in one line naming the damaged checkpoint (exit 2, no traceback,
the work directory not created or unchanged, see ``tests/faults.py``). A bit flip is the case
Orbax alone misses: TensorStore reads the flipped data without an error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from faults import DATA, refused

from ddjax import checkpoint, data, experts, loop, models
from ddjax.config import load_config
from ddjax.sre2l import squeeze
from ddjax.sre2l import teacher as teacher_lib
from ddjax.workdir import Workdir

ROOT = Path(__file__).resolve().parent.parent
MODEL = "ConvNetW8"

# --------------------------------------------------------------------------------------------
# The damage
# --------------------------------------------------------------------------------------------


def _largest_data_file(checkpoint: Path) -> Path:
    return max(
        (p for p in checkpoint.rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip_a_bit(file: Path) -> None:
    content = bytearray(file.read_bytes())
    content[len(content) // 2] ^= 0x10
    file.write_bytes(bytes(content))


def _missing(checkpoint: Path) -> None:
    _largest_data_file(checkpoint).unlink()


def _truncated(checkpoint: Path) -> None:
    _truncate(_largest_data_file(checkpoint))


def _bit_flipped(checkpoint: Path) -> None:
    _flip_a_bit(_largest_data_file(checkpoint))


def _metadata_corrupt(checkpoint: Path) -> None:
    next(checkpoint.rglob("_METADATA")).write_text('{"tree_metadata": ')


def _half_deleted(checkpoint: Path) -> None:
    shutil.rmtree(next(checkpoint.rglob("ocdbt.process_0")))


DAMAGE = {
    "missing": _missing,
    "truncated": _truncated,
    "bit_flipped": _bit_flipped,
    "metadata_corrupt": _metadata_corrupt,
    "half_deleted": _half_deleted,
}


def _config_args(spec: str, *overrides: str) -> list[str]:
    return ["--config", spec, *(f"--config.{o}" for o in overrides)]


def _config(argv: list[str]):
    """The config the CLI builds from ``argv`` (so a run made through the API resumes)."""
    spec = argv[argv.index("--config") + 1]
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    return load_config(spec, overrides)


# --------------------------------------------------------------------------------------------
# Inputs: experts, a teacher, killed runs (made once, copied before each damage)
# --------------------------------------------------------------------------------------------


def _random_like(shapes, rng) -> dict:
    """Random float32 arrays of ``shapes`` (positive, so valid as BatchNorm variances too)."""
    return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    """Two complete experts of 2 epochs (random trajectories: distill refuses before use).

    ``experts.json`` holds what distill checks; the trajectories are written as ``ddjax
    experts`` writes them (:func:`ddjax.checkpoint.save_tree`).
    """
    out = tmp_path_factory.mktemp("experts") / "experts"
    dataset = data.load_dataset(DATA)
    meta = {
        "format": experts.FORMAT,
        "dataset": dataset.name,
        "zca": False,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "image_shape": list(dataset.image_shape),
        "num_classes": dataset.num_classes,
        "model": MODEL,
        "model_overrides": {},
        "epochs": 2,
        "num_experts": 2,
        "completed": [0, 1],
        "experts": {},
    }
    out.mkdir()
    (out / experts.META_FILE).write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for index in meta["completed"]:
        trajectory = _random_like(experts.trajectory_shapes(meta), rng)
        checkpoint.save_tree(experts.expert_dir(out, index), {"params": trajectory})
    return out


def _distill_args(experts_path: Path) -> list[str]:
    return _config_args(
        "configs/distill/mtt.py:cifar10,ipc=1",
        f"dataset.name={DATA}",
        "dataset.zca=False",
        "ipc=1",
        f"model={MODEL}",
        "syn_steps=1",
        "expert_epochs=1",
        "max_start_epoch=1",
        "iterations=1",
        f"experts_dir={experts_path}",
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A BatchNorm ConvNet teacher with random variables, saved as squeeze saves one."""
    net = models.get_model("ConvNetBN", 3, (8, 8, 1), width=8, depth=2)
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    teacher_lib.save_teacher(
        path,
        model_name="ConvNetBN",
        model_overrides={"width": 8, "depth": 2},
        variables=_random_like(models.variable_shapes(net, (8, 8, 1)), np.random.default_rng(1)),
        dataset=data.load_dataset(DATA),
    )
    return path


def _recover_args(teacher_path: Path, *overrides: str) -> list[str]:
    return _config_args(
        "configs/recover/sre2l.py:cifar10",
        f"dataset.name={DATA}",
        "ipc=1",
        "batch_size=3",
        "iterations=4",
        f"teacher={teacher_path}",
        *overrides,
    )


SQUEEZE = _config_args(
    "configs/squeeze/sre2l.py:digits",
    f"dataset.name={DATA}",
    "model=ConvNetBN",
    "width=8",
    "epochs=4",
    "batch_size=12",
    "checkpoint_every=2",
    "test_every=4",
)


@pytest.fixture(scope="module")
def squeeze_runs(tmp_path_factory):
    """A squeeze run killed twice, then finished: ``(killed, finished)`` work directories.

    Killed after epoch 1 (before any checkpoint), then after epoch 3 of the resumed call
    (checkpoint at 2; ``killed`` is a copy of this state), then resumed to the end.
    """
    root = tmp_path_factory.mktemp("squeeze")
    workdir, config = root / "run", _config(SQUEEZE)
    squeeze.run_squeeze(config, workdir, progress=False, _stop_after_epochs=1)
    assert not (workdir / "checkpoints" / "2").exists()
    squeeze.run_squeeze(config, workdir, progress=False, _stop_after_epochs=3)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    shutil.copytree(workdir, root / "killed")
    squeeze.run_squeeze(config, workdir, progress=False)
    return root / "killed", workdir


@pytest.fixture(scope="module")
def killed_recover(teacher_dir, tmp_path_factory):
    """A recover work directory whose one batch has an in-batch checkpoint, as a kill leaves
    it (the arrays' values do not matter: the file is refused before they are used)."""
    workdir = tmp_path_factory.mktemp("recover") / "run"
    config = _config(_recover_args(teacher_dir, "checkpoint_every=2"))
    Workdir(workdir, config, "recover")
    rng = np.random.default_rng(2)
    loop.atomic_savez(
        workdir / "inflight.npz",
        batch=np.int64(0),
        classes=np.arange(3),
        ipc_ids=np.zeros(3, np.int64),
        **{"state/images": rng.normal(size=(3, 8, 8, 1)), "state/step": np.int64(2)},
    )
    return workdir


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_expert_is_refused_before_distill_writes_anything(
    damage, experts_dir, tmp_path, capsys
):
    copy = tmp_path / "experts"
    shutil.copytree(experts_dir, copy)
    DAMAGE[damage](copy / "expert_0001")
    argv = ["distill", *_distill_args(copy), "--workdir", tmp_path / "run"]
    line = refused(argv, capsys, str(copy / "expert_0001"), watch=[copy])
    assert "re-run the ddjax experts command" in line or "not a complete checkpoint" in line


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_teacher_is_refused_before_recover_writes_anything(
    damage, teacher_dir, tmp_path, capsys
):
    copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir, copy)
    DAMAGE[damage](copy / "variables")
    argv = ["recover", *_recover_args(copy), "--workdir", tmp_path / "run"]
    line = refused(argv, capsys, str(copy / "variables"), watch=[copy])
    assert "re-create the teacher" in line


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_resume_checkpoint_is_refused_with_the_workdir_unchanged(
    damage, squeeze_runs, tmp_path, capsys
):
    workdir = tmp_path / "run"
    shutil.copytree(squeeze_runs[0], workdir)
    DAMAGE[damage](workdir / "checkpoints" / "2")
    argv = ["squeeze", *SQUEEZE, "--workdir", workdir]
    line = refused(argv, capsys, str(workdir / "checkpoints" / "2"))
    assert "to start the run again from the beginning" in line


@pytest.mark.parametrize("damage", [_truncate, _flip_a_bit])
def test_a_damaged_in_batch_checkpoint_of_recover_is_refused(
    damage, teacher_dir, killed_recover, tmp_path, capsys
):
    workdir = tmp_path / "run"
    shutil.copytree(killed_recover, workdir)
    damage(workdir / "inflight.npz")
    argv = ["recover", *_recover_args(teacher_dir, "checkpoint_every=2"), "--workdir", workdir]
    line = refused(argv, capsys, str(workdir / "inflight.npz"))
    assert "delete it to restart that batch" in line


def test_the_real_command_prints_exactly_one_line(teacher_dir, tmp_path):
    """In a real process nothing more reaches stderr, at exit either. The case: a teacher.json
    that does not describe its variables (a wider model), which Orbax used to fail on inside
    its asynchronous reads, followed by 68 lines of asyncio messages."""
    copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir, copy)
    meta = json.loads((copy / teacher_lib.META_FILE).read_text())
    meta["model_overrides"]["width"] = 16
    (copy / teacher_lib.META_FILE).write_text(json.dumps(meta))
    argv = ["recover", *_recover_args(copy), "--workdir", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "ddjax.cli", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"ddjax: error: checkpoint {copy / 'variables'} does not match")
    assert "has shape (8,), expected (16,); re-create the teacher" in lines[0]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# Clean resume
# --------------------------------------------------------------------------------------------


def _events(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def test_squeeze_killed_twice_logs_every_epoch_once(squeeze_runs):
    """The epochs redone after each resume replace the ones the kills lost."""
    killed, finished = squeeze_runs
    assert [e["epoch"] for e in _events(killed)] == [1, 2, 3]
    events = _events(finished)
    assert [e["epoch"] for e in events if e["event"] == "squeeze_epoch"] == [1, 2, 3, 4]
    assert [e["event"] for e in events][-1] == "squeeze_done"
    # Old steps are renamed away before they are deleted: only the newest is left.
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["4"]


def test_rewind_drops_what_comes_after_the_restored_position(tmp_path):
    import ml_collections

    work = Workdir(tmp_path / "run", ml_collections.ConfigDict({"seed": 0}), "test")
    records = [
        {"event": "init"},
        {"event": "step", "batch": 0, "iteration": 2},
        {"event": "batch", "batch": 0, "iteration": 4},
        {"event": "step", "batch": 1, "iteration": 2},
        {"event": "eval", "batch": 1, "iteration": 4},
        {"event": "step", "batch": 1, "iteration": 4},
    ]
    for record in records:
        work.log(**record)
    with open(work.file("metrics.jsonl"), "a") as f:
        f.write('{"event": "step", "ba')  # a line cut by a kill
    assert work.rewind((1, 2), key=("batch", "iteration"), keep=("eval",)) == 2
    assert [r["event"] for r in _events(work.path)] == ["init", "step", "batch", "step", "eval"]
    assert work.rewind(None, where={"batch": 0}) == 2
    assert [r["event"] for r in _events(work.path)] == ["init", "step", "eval"]
    assert work.rewind(None) == 3 and work.file("metrics.jsonl").read_text() == ""
    assert work.rewind(0) == 0
