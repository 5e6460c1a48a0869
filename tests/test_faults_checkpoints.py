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

import numpy as np
import pytest
from faults import DATA, refused

from ddjax import data, experts, models
from ddjax.config import load_config
from ddjax.sre2l import recover, squeeze
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


def _missing(checkpoint: Path) -> None:
    _largest_data_file(checkpoint).unlink()


def _truncated(checkpoint: Path) -> None:
    file = _largest_data_file(checkpoint)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _bit_flipped(checkpoint: Path) -> None:
    file = _largest_data_file(checkpoint)
    content = bytearray(file.read_bytes())
    content[len(content) // 2] ^= 0x10
    file.write_bytes(bytes(content))


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


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "experts"
    experts.train_experts(
        data.load_dataset(DATA),
        out_dir=out,
        model=MODEL,
        num_experts=2,
        epochs=2,
        experts_at_once=2,
        test_every=2,
        progress=False,
    )
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
    net = models.get_model("ConvNetBN", 3, (8, 8, 1), width=8, depth=2)
    variables = models.init_variables(net, __import__("jax").random.key(0), (8, 8, 1))
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    teacher_lib.save_teacher(
        path,
        model_name="ConvNetBN",
        model_overrides={"width": 8, "depth": 2},
        variables=variables,
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
def killed_squeeze(tmp_path_factory):
    """A squeeze run killed after 3 of 4 epochs: its newest checkpoint is epoch 2."""
    workdir = tmp_path_factory.mktemp("squeeze") / "run"
    squeeze.run_squeeze(_config(SQUEEZE), workdir, progress=False, _stop_after_epochs=3)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    return workdir


@pytest.fixture(scope="module")
def killed_recover(teacher_dir, tmp_path_factory):
    """A recover run killed at iteration 3 of its one batch; ``inflight.npz`` holds 2."""
    workdir = tmp_path_factory.mktemp("recover") / "run"
    config = _config(_recover_args(teacher_dir, "checkpoint_every=2"))
    recover.run_recover(config, str(workdir), progress=False, _stop_after_iterations=3)
    assert (workdir / "inflight.npz").is_file()
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
    damage, killed_squeeze, tmp_path, capsys
):
    workdir = tmp_path / "run"
    shutil.copytree(killed_squeeze, workdir)
    DAMAGE[damage](workdir / "checkpoints" / "2")
    argv = ["squeeze", *SQUEEZE, "--workdir", workdir]
    line = refused(argv, capsys, str(workdir / "checkpoints" / "2"))
    assert "to start the run again from the beginning" in line


def _inflight_truncated(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _inflight_bit_flipped(file: Path) -> None:
    content = bytearray(file.read_bytes())
    content[len(content) // 2] ^= 0x10
    file.write_bytes(bytes(content))


@pytest.mark.parametrize("damage", [_inflight_truncated, _inflight_bit_flipped])
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
    """In a real process, nothing more reaches stderr: no asyncio or TensorStore messages
    from Orbax's abandoned reads, at exit either."""
    copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir, copy)
    _bit_flipped(copy / "variables")
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
    assert len(lines) == 1 and lines[0].startswith("ddjax: error: checkpoint "), done.stderr
    assert str(copy / "variables") in lines[0]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# Clean resume
# --------------------------------------------------------------------------------------------


def _events(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def test_squeeze_killed_twice_logs_every_epoch_once(killed_squeeze, tmp_path):
    """Killed after epoch 1 (before any checkpoint), then after epoch 3 (checkpoint at 2):
    the epochs redone after each resume replace the ones the kill lost."""
    workdir = tmp_path / "run"
    config = _config(SQUEEZE)
    squeeze.run_squeeze(config, workdir, progress=False, _stop_after_epochs=1)
    assert not (workdir / "checkpoints" / "2").exists()
    squeeze.run_squeeze(config, workdir, progress=False, _stop_after_epochs=3)
    assert [e["epoch"] for e in _events(workdir)] == [1, 2, 3]
    squeeze.run_squeeze(config, workdir, progress=False)
    events = _events(workdir)
    assert [e["epoch"] for e in events if e["event"] == "squeeze_epoch"] == [1, 2, 3, 4]
    assert [e["event"] for e in events][-1] == "squeeze_done"
    # The same numbers as the run killed once at epoch 3 and resumed.
    assert events[:3] == _events(killed_squeeze)[:3]
    # A half-deleted old step, as a kill during its deletion leaves it, is never read.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4"]


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
    np.testing.assert_equal(work.rewind(0), 0)
