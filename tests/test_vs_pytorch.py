"""benchmarks/vs_pytorch.py without the official code: its refusal, judgements and report.

The timed workers need the official checkouts (and torch, kornia, torchvision); what is tested
here is what decides and reports: the one-line refusal, the sanity check's verdict, the memory
prediction that keeps a configuration from running, the time budget, and the Markdown/plot.
"""

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_pytorch.py"


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location("vs_pytorch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        ((), "--mtt PATH is required: a local checkout of GeorgeCazenavette/mtt-distillation"),
        (("--only", "recover"), "--sre2l PATH is required: a local checkout of VILA-Lab/SRe2L"),
        (("--mtt", "{tmp}", "--sre2l", "{tmp}"), "is not a checkout of Georg"),
    ],
)
def test_refuses_without_checkouts_in_one_line(tmp_path, args, expected):
    done = _run(*(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vs_pytorch.py: error: ")
    assert expected in lines[0]


def test_finds_the_checkouts_and_names_missing_files(vs, tmp_path):
    mtt, sre2l = tmp_path / "mtt", tmp_path / "sre2l"
    small = sre2l / "SRe2L" / "*small_dataset"
    for folder, files in ((mtt, vs.MTT_FILES), (small, vs.SRE2L_FILES)):
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_text("")
    args = argparse.Namespace(mtt=str(mtt), sre2l=str(sre2l), only=None)
    dirs, refusal = vs.checkout_dirs(args)
    assert refusal is None
    assert dirs == {"mtt": str(mtt.resolve()), "recover": str(small.resolve())}
    # The small-dataset folder itself also does.
    args.sre2l = str(small)
    assert vs.checkout_dirs(args)[0]["recover"] == str(small.resolve())
    (mtt / "reparam_module.py").unlink()
    _, refusal = vs.checkout_dirs(args)
    assert "--mtt" in refusal and "reparam_module.py" in refusal and "networks.py" not in refusal
    assert vs.checkout_commit(str(tmp_path)) == "unknown"


def test_sanity_check_fails_on_a_different_loss(vs, tmp_path):
    grads = (tmp_path / "official.npz", tmp_path / "ddjax.npz")
    np.savez(grads[0], images=np.array([1.0, -2.0]))
    np.savez(grads[1], images=np.array([1.0, -2.002]))
    paths = tuple(map(str, grads))
    same = vs.compare_check({"loss": 1.0}, {"loss": 1.0 + 5e-5}, paths, ["loss"])
    assert same["ok"]
    assert same["relative_difference"]["grad_images"] == pytest.approx(1e-3)
    assert not vs.compare_check({"loss": 1.0}, {"loss": 1.001}, paths, ["loss"])["ok"]
    failed = vs.compare_check({"error": "exit code 1: boom"}, {"loss": 1.0}, paths, ["loss"])
    assert not failed["ok"] and "boom" in failed["error"]


def test_sanity_check_says_which_side_is_off_from_float64(vs, tmp_path):
    grads = (tmp_path / "official.npz", tmp_path / "ddjax.npz")
    np.savez(grads[0], images=np.array([1.0, -2.0]))
    np.savez(grads[1], images=np.array([1.0, -2.02]))
    np.savez(f"{grads[1]}.float64.npz", images=np.array([1.0, -2.000002]))
    paths = tuple(map(str, grads))
    ddjax = {"loss": 1.0 + 2e-6, "float64": {"loss": 1.0}}
    record = vs.compare_check({"loss": 1.0 + 1e-8}, ddjax, paths, ["loss"])
    distance = record["float64_distance"]
    assert distance["official"]["loss"] == pytest.approx(1e-8)
    assert distance["ddjax"]["loss"] == pytest.approx(2e-6)
    assert distance["official"]["grad_images"] == pytest.approx(1e-6, rel=1e-3)
    assert distance["ddjax"]["grad_images"] == pytest.approx(0.019998 / 2.000002, rel=1e-3)
    line = vs._check_line(record)
    assert "official from float64: loss 1.0e-08" in line and "ddjax from float64" in line


def test_predicts_that_a_configuration_does_not_fit(vs):
    gib = 2**30
    # The official code's peak grows by 0.3 GiB per inner step from 0.6 GiB.
    points = [(1, 0.9 * gib), (4, 1.8 * gib), (10, 3.6 * gib)]
    assert vs.predict_official_peak(points, 80) == pytest.approx(24.6 * gib)
    assert vs._not_fitting(vs.predict_official_peak(points, 40), 22 * gib) is None
    reason = vs._not_fitting(vs.predict_official_peak(points, 80), 22 * gib)
    assert reason == "does not fit in 22.0 GiB available (predicted 24.6 GiB)"
    assert vs._not_fitting(100 * gib, None) is None  # nothing known: run it


def test_mtt_driver_runs_the_official_code_only_where_it_fits(vs, tmp_path, monkeypatch):
    gib = 2**30
    spawned = []

    def fake_spawn(kind, opts, timeout_s):
        """Workers as they would answer: official peak 0.6 GiB + 0.3 GiB per inner step."""
        spawned.append((kind, opts.get("n"), opts.get("mode")))
        if opts.get("check"):
            np.savez(opts["check"], images=np.ones(3))
            return {"loss": 1.0, "device": "cpu"}
        if opts.get("probe"):
            points = [{"n": n, "peak_bytes": (0.6 + 0.3 * n) * gib} for n in opts["probe"]]
            return {"points": points, "peak_kind": "RSS", "device_total_bytes": 10 * gib}
        peak = (0.6 + 0.3 * opts["n"]) * gib if kind == "mtt-official" else gib
        return {"s_per_iter": 2.0 if kind == "mtt-official" else 1.0, "peak_bytes": peak}

    monkeypatch.setattr(vs, "_spawn", fake_spawn)
    args = argparse.Namespace(preset="fashion_mnist", ns=[10, 40], modes=["remat"])
    section = vs.run_mtt(args, {"mtt": "/m"}, tmp_path / "p.npz", tmp_path, {"timeout_s": 1})
    assert section["check"]["ok"]
    official_10, remat_10, official_40, remat_40 = section["rows"]
    assert official_10["s_per_iter"] == 2.0 and remat_10["time_ratio"] == 0.5
    assert remat_10["memory_ratio"] == pytest.approx(1 / 3.6)
    # 12.6 GiB predicted at N = 40 against 90% of 10 GiB: reported, not run.
    assert official_40["skipped"] == "does not fit in 10.0 GiB available (predicted 12.6 GiB)"
    assert ("mtt-official", 40, None) not in spawned and ("mtt-ddjax", 40, "remat") in spawned
    assert remat_40["s_per_iter"] == 1.0 and "time_ratio" not in remat_40


def test_time_budget_stops_repeating_after_one_timed_iteration(vs):
    calls = []
    timing = vs._time_iterations(
        lambda: calls.append(time.sleep(0.02)),
        warmup=1,
        repeats=5,
        budget_s=0.03,
        started=time.perf_counter(),
    )
    assert len(calls) == 2 and timing["repeats_done"] == 1
    assert timing["s_per_iter"] >= 0.02 and len(timing["warmup_times"]) == 1
    full = vs._time_iterations(
        lambda: None, warmup=0, repeats=3, budget_s=60, started=time.perf_counter()
    )
    assert full["repeats_done"] == 3


def test_report_gives_ratios_and_unfit_configurations(vs, tmp_path):
    gib = 2**30
    official = {"n": 10, "side": "official", "s_per_iter": 10.0, "peak_bytes": 4 * gib}
    remat = {"n": 10, "side": "ddjax", "mode": "remat", "s_per_iter": 8.0, "peak_bytes": gib}
    vs._ratios(remat, official)
    assert remat["time_ratio"] == pytest.approx(0.8) and remat["memory_ratio"] == 0.25
    unfit = {"n": 80, "side": "official", "skipped": "does not fit in 22.0 GiB available"}
    unfit["predicted_bytes"] = 24.6 * gib
    check = {"ok": True, "official": {"loss": 1.0}, "ddjax": {"loss": 1.0}}
    check["relative_difference"] = {"loss": 0.0}
    env = {"device": "cpu: cpu", "cpu_model": "x", "cpu_count": 2, "python": "3"}
    env.update(jax="j", jaxlib="j", flax="f", torch="t", torchvision="v", kornia="k")
    settings = {
        "preset": "fashion_mnist",
        "torch_device": "cpu",
        "torch_threads": 2,
        "xla_flags": "",
        "repeats": 5,
        "warmup": 1,
        "model": "ConvNet-3",
        "batch_syn": 100,
        "image_shape": [28, 28, 1],
        "ipc": 10,
        "dsa_strategy": "color",
        "loop": "unrolled",
    }
    report = {
        "command": "python benchmarks/vs_pytorch.py",
        "environment": env,
        "settings": settings,
        "checkouts": {"mtt": {"path": "/m", "commit": "unknown"}},
        "mtt": {"check": check, "rows": [official, remat, unfit]},
    }
    text = vs.markdown(report)
    assert "| 10 | ddjax remat | 8 | – | 1.00 | 0.80x | 0.25x |" in text
    assert "| 80 | official |" in text and "does not fit in 22.0 GiB available" in text
    vs.plot(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 0
