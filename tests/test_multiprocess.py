"""Multi-process runs: two processes on 127.0.0.1 (``jax.distributed``, CPU devices) give what
one process gives, only process 0 writes the shared outputs, and a killed run resumes.

Each two-process run is the CLI as a user launches it (README, "Multi-process runs"): the same
command twice with ``--coordinator 127.0.0.1:PORT --num_processes 2 --process_id I``, each
process with two CPU devices, so the stages' meshes span both processes. The one-process
references run in this pytest process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ddjax import cli, distributed, loop
from ddjax.errors import DDJaxError
from ddjax.experts import store as experts_store
from ddjax.sre2l import teacher as teacher_lib
from ddjax.workdir import Workdir

pytestmark = pytest.mark.slow

EXPERTS = [
    "--config=configs/experts/mtt.py:digits",
    "--config.num_experts=2",
    "--config.experts_at_once=2",
    "--config.epochs=2",
    "--config.checkpoint_every=1",
    "--config.dataset.train_limit=200",
    "--config.test_limit=100",
]
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(x64: bool = False, devices: int = 2) -> dict:
    # XLA_FLAGS extended, not replaced: a flag such as --xla_cpu_max_isa=AVX2 reaches them too.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": flags}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_ENABLE_X64", None)
    if x64:
        env["JAX_ENABLE_X64"] = "1"
    return env


def _start(stage: str, args: list[str], workdir: Path, x64: bool = False) -> list:
    """Starts the two processes of one run; returns their ``Popen``s."""
    port = _free_port()
    procs = []
    for i in range(2):
        command = [sys.executable, "-m", "ddjax.cli", stage, *args, f"--workdir={workdir}"]
        command += [f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
        log = open(workdir.parent / f"{workdir.name}.p{i}.log", "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(command, cwd=ROOT, env=_env(x64), stdout=log, stderr=subprocess.STDOUT)
        )
    return procs


def _wait(procs: list, workdir: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(workdir.parent / f"{workdir.name}.p{i}.log").read_text() for i in range(2)]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(log[-3000:] for log in logs)


def _run_two(stage: str, args: list[str], workdir: Path, x64: bool = False) -> None:
    _wait(_start(stage, args, workdir, x64), workdir)


def _run_one(stage: str, args: list[str], workdir: Path, x64: bool = False) -> None:
    # The global switch, not jax.enable_x64's thread-local one: Orbax reads and writes in
    # threads of its own. Compiled programs are keyed on it, so nothing leaks into other tests.
    jax.config.update("jax_enable_x64", x64)
    try:
        assert cli.main([stage, *args, f"--workdir={workdir}"]) == 0
    finally:
        jax.config.update("jax_enable_x64", False)


def _shared_outputs_written_once(one: Path, two: Path, resumed: bool = False) -> None:
    """The same files as one process wrote, no leftovers, and every log line once.

    Inside Orbax checkpoints (saved by all processes together) file names are Orbax's own.
    A ``resumed`` run's log holds the killed run's lines too: only the files are compared.
    """

    def listing(d: Path) -> list[str]:
        def in_checkpoint(p: Path) -> bool:
            return any((q / "_CHECKPOINT_METADATA").exists() for q in p.parents if q != d)

        return sorted(
            str(p.relative_to(d))
            for p in d.rglob("*")
            if "checkpoints" not in p.parts and not in_checkpoint(p)
        )

    assert listing(two) == listing(one)
    assert not list(two.rglob(f"*{loop.TMP_SUFFIX}"))
    if resumed:
        return
    events = lambda d: [  # noqa: E731
        json.loads(line)["event"] for line in (d / "metrics.jsonl").read_text().splitlines()
    ]
    assert events(two) == events(one)
    assert json.loads((two / "config.json").read_text()) == json.loads(
        (one / "config.json").read_text()
    )


# The runs compared below are float64 (jax_enable_x64: every network, state and statistic
# follows it) wherever a tolerance would otherwise be float32 reordering grown by training:
# splitting a batch over processes reorders its sums, ~1e-16 relative in float64, grown by
# these few steps to ~1e-13 at most, while float32's ~1e-7 grew to ~1e-5 and could flip a
# near-tie prediction, depending on the CPU's instruction set. What is written in float32
# (trajectories, synthetic images, reported losses) is rounded once from float64, so two runs
# differ there by at most one float32 ulp: rtol=2**-22 (2^-23 relative, with a factor 2).
FLOAT32_ROUNDING = 2**-22


@pytest.fixture(scope="module")
def experts_one(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("one") / "experts"
    _run_one("experts", EXPERTS, workdir, x64=True)
    return workdir


def _assert_experts_equal(a: Path, b: Path) -> None:
    ta, tb = (experts_store.load_trajectories(d, [0, 1]) for d in (a, b))
    for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb), strict=True):
        np.testing.assert_allclose(y, x, rtol=FLOAT32_ROUNDING)
    ra, rb = (json.loads((d / "experts.json").read_text())["experts"] for d in (a, b))
    for i in ra:
        assert rb[i]["test_accuracy"] == ra[i]["test_accuracy"]
        np.testing.assert_allclose(rb[i]["train_loss"], ra[i]["train_loss"], rtol=FLOAT32_ROUNDING)
    fa, fb = (np.load(d / "forgetting.npz") for d in (a, b))
    for name in fa.files:
        np.testing.assert_array_equal(fb[name], fa[name])


def test_two_processes_killed_and_restarted_train_the_same_experts_as_one(experts_one, tmp_path):
    """Two processes train the experts one process trains, through a kill of both: one host
    dies after the first checkpoint, the other is stopped, both restart and resume.

    (The uninterrupted two-process run is the other stages' tests: distill, recover, KD.)
    """
    workdir = tmp_path / "experts"
    procs = _start("experts", EXPERTS, workdir, x64=True)
    first_checkpoint = workdir / "_partial" / "checkpoints" / "1"
    deadline = time.monotonic() + TIMEOUT
    while not first_checkpoint.exists() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended before the kill"
        time.sleep(0.2)
    assert first_checkpoint.exists()
    procs[1].send_signal(signal.SIGKILL)  # one host dies; the scheduler then stops the other
    procs[1].wait()
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    assert not (workdir / "results.json").exists()
    restarted = time.time()

    _run_two("experts", EXPERTS, workdir, x64=True)
    _assert_experts_equal(experts_one, workdir)
    _shared_outputs_written_once(experts_one, workdir, resumed=True)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs_after = [r for r in logged if r["event"] == "expert_epoch" and r["time"] >= restarted]
    assert len(epochs_after) == 1  # it went on from the checkpoint of epoch 1, not from the start


def test_two_processes_distill_like_one(experts_one, tmp_path):
    args = [
        "--config=configs/distill/mtt.py:digits,ipc=1",
        f"--config.experts_dir={experts_one}",
        "--config.dataset.train_limit=200",  # the experts' (checked)
        "--config.iterations=1",
        "--config.syn_steps=1",
        "--config.expert_epochs=1",
        "--config.max_start_epoch=1",
        "--config.eval_every=1",
        "--config.eval.epochs=1",
        "--config.eval.num_models=2",
        "--config.eval.protocol=dc",  # no DSA to compile for the evaluations
        "--config.checkpoint_every=1",
    ]
    _run_one("distill", args, tmp_path / "one", x64=True)
    _run_two("distill", args, tmp_path / "two", x64=True)
    one, two = (np.load(tmp_path / d / "synset.npz") for d in ("one", "two"))
    # The inner loop's batch is split over all devices in both runs; the processes' sums
    # reach the images in another order, which the image learning rate (1000) magnifies by
    # up to ~1e5 (float32: 1e-7 became 2e-2 at worst). In float64 that is ~1e-11, below a
    # float32 ulp of the saved pixels but for those within 1e-9 of zero (a wrong batch or key
    # would differ by ~1).
    np.testing.assert_allclose(two["images"], one["images"], rtol=FLOAT32_ROUNDING, atol=1e-9)
    np.testing.assert_allclose(two["learning_rate"], one["learning_rate"], rtol=FLOAT32_ROUNDING)
    np.testing.assert_array_equal(two["labels"], one["labels"])
    _shared_outputs_written_once(tmp_path / "one", tmp_path / "two")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("squeeze") / "squeeze"
    args = [
        "--config=configs/squeeze/sre2l.py:digits",
        "--config.epochs=2",
        "--config.dataset.train_limit=300",
        "--config.test_limit=100",
    ]
    _run_one("squeeze", args, workdir)
    return workdir / "teacher"


def test_two_processes_recover_like_one(teacher, tmp_path, monkeypatch):
    """The batches are plan_batches' in both runs, each split over both processes' devices;
    every finished batch is written at once into the synthetic folder (PNG: the digits row has
    no JPEG) and the batch in progress is checkpointed (gathered from both processes)."""
    from ddjax.synfolder import open_synfolder

    # float64: the batch's BN statistics are summed over both processes' devices; in float64
    # the reordering stays far below what a per-process statistic would change (~1e-1).
    monkeypatch.setenv("JAX_ENABLE_X64", "1")
    args = [
        "--config=configs/recover/sre2l.py:digits",
        f"--config.teacher={teacher}",
        "--config.ipc=2",
        "--config.iterations=4",
        "--config.log_every=2",
        "--config.output=folder",
        "--config.checkpoint_every=2",
    ]
    code = subprocess.run(
        [sys.executable, "-m", "ddjax.cli", "recover", *args, f"--workdir={tmp_path / 'one'}"],
        cwd=ROOT,
        env=_env(x64=True, devices=4),
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stderr[-3000:]
    _run_two("recover", args, tmp_path / "two", x64=True)
    one, two = (open_synfolder(tmp_path / d / "synset") for d in ("one", "two"))
    np.testing.assert_array_equal(two.labels, one.labels)
    np.testing.assert_array_equal(two.all_images(), one.all_images())
    assert two.fingerprint == one.fingerprint  # the same PNG bytes
    events = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert [e["iteration"] for e in events if e["event"] == "checkpoint"] == [2, 2]
    assert not (tmp_path / "two" / "inflight.npz").exists()
    _shared_outputs_written_once(tmp_path / "one", tmp_path / "two")


def test_two_processes_train_kd_students_like_one(teacher, tmp_path):
    synset = tmp_path / "recovered"
    _run_one(
        "recover",
        [
            "--config=configs/recover/sre2l.py:digits",
            f"--config.teacher={teacher}",
            "--config.ipc=2",
            "--config.iterations=2",
        ],
        synset,
    )
    args = [
        "--config=configs/relabel/sre2l.py:digits",
        f"--config.teacher={teacher}",
        f"--config.synset={synset / 'synset.npz'}",
        "--config.recipe.epochs=2",
        "--config.eval.num_models=2",
    ]
    _run_one("relabel", args, tmp_path / "one", x64=True)
    _run_two("relabel", args, tmp_path / "two", x64=True)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    a, b = one["eval"]["ConvNet"], two["eval"]["ConvNet"]
    assert b["accuracies"] == a["accuracies"]
    np.testing.assert_allclose(b["final_train_loss"], a["final_train_loss"], rtol=FLOAT32_ROUNDING)
    assert two["labels"]["storage_bytes"] == one["labels"]["storage_bytes"]
    for epoch_file in sorted((tmp_path / "one" / "labels").glob("epoch_*")):
        assert (tmp_path / "two" / "labels" / epoch_file.name).read_bytes() == (
            epoch_file.read_bytes()
        )
    _shared_outputs_written_once(tmp_path / "one", tmp_path / "two")


def test_two_processes_squeeze_a_stream_like_one(tmp_path):
    """Data parallel from a stream: each process reads half of every batch (grain), the batch's
    BatchNorm statistics are the whole batch's, and the teacher is one process's."""
    pytest.importorskip("grain")
    from test_stream_stages import squeeze_args, write_imagenet_folder

    folder = write_imagenet_folder(tmp_path / "imagenet", train=12, val=3)
    args = squeeze_args(folder)
    one = subprocess.run(
        [sys.executable, "-m", "ddjax.cli", "squeeze", *args, f"--workdir={tmp_path / 'one'}"],
        cwd=ROOT,
        env=_env(x64=True, devices=4),
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    _run_two("squeeze", args, tmp_path / "two", x64=True)
    # Both float64 teachers, read back here (x64 off) as float32: one rounding each.
    teachers = [
        teacher_lib.load_teacher(tmp_path / d / "teacher").variables for d in ("one", "two")
    ]
    for a, b in zip(*(jax.tree.leaves(t) for t in teachers), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=FLOAT32_ROUNDING)
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two")]
    assert results[1]["test_accuracy_by_epoch"] == results[0]["test_accuracy_by_epoch"]
    np.testing.assert_allclose(
        results[1]["train_loss"], results[0]["train_loss"], rtol=FLOAT32_ROUNDING
    )
    _shared_outputs_written_once(tmp_path / "one", tmp_path / "two")


# --------------------------------------------------------------------------------------------
# In one process: the launch flags, and what a process other than 0 writes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--coordinator=nohost"], r"--coordinator must be HOST:PORT"),
        (["--coordinator=127.0.0.1:1234"], r"needs --num_processes P and --process_id I"),
        (["--num_processes=2", "--process_id=0"], r"need --coordinator HOST:PORT"),
        (
            ["--coordinator=127.0.0.1:1234", "--num_processes=2", "--process_id=2"],
            r"--process_id must be in \[0, 2\), got 2",
        ),
        (
            ["--coordinator=127.0.0.1:1234", "--num_processes=0", "--process_id=0"],
            r"--num_processes must be >= 1, got 0",
        ),
    ],
)
def test_bad_launch_flags_give_one_line_before_any_output(flags, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["experts", *EXPERTS, f"--workdir={workdir}", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddjax: error:")
    assert re.search(message, err)
    assert not workdir.exists()


def test_a_process_other_than_0_writes_nothing(tmp_path, monkeypatch):
    import ml_collections

    workdir = Workdir(tmp_path / "run", ml_collections.ConfigDict({"a": 1}), "test")
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    workdir.log(event="x")
    workdir.save_results({"a": 1})
    loop.atomic_savez(tmp_path / "run" / "x.npz", a=np.zeros(3))
    distributed.on_primary("remove", lambda: (tmp_path / "run" / "config.json").unlink())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]
    with pytest.raises(DDJaxError, match="--process_id must be in"):
        distributed.Launch("127.0.0.1:1", 2, 5)
