r"""SRe2L recover: iterations per second and memory against the batch size.

One iteration is :func:`ddjax.sre2l.recover_step.make_recover_step`'s step: the shared multi-crop
augmentation, the teacher's forward pass in eval mode with every BatchNorm input's statistics,
the cross-entropy + BN-matching loss, its gradient w.r.t. the images, Adam and the clip. The
teacher is a ResNet-18 with BatchNorm (``ResNet18BN``: the small-image stem for 32/64 px, as
SRe2L's CIFAR/Tiny teachers; the ImageNet stem at 224 px, torchvision's ``resnet18``), with
PyTorch-default initial weights (the cost of an iteration does not depend on their values).
Per batch size, each in a fresh subprocess so that the process's peak memory is its own:

* iterations per second: 1 / the median of ``--repeats`` timed iterations after ``--warmup``
  untimed ones (``block_until_ready`` after each), and images per second;
* compiled memory from ``jax.jit(step).lower(...).compile().memory_analysis()`` (temp,
  arguments, outputs);
* peak memory: the process's peak resident set size (``ru_maxrss``) on CPU, the device's
  ``peak_bytes_in_use`` on GPU (with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``);
* compile time.

Presets (``--preset``) follow SRe2L's recover settings (research/sre2l.md §3.5): ``cifar``
(32 px, 100 classes, no crop or flip, roll U{0..4}), ``tiny`` (64 px, 200 classes, crop + flip,
roll U{-4..4}), ``imagenet`` (224 px, 1,000 classes, crop + flip, roll U{0..32}).

  python benchmarks/recover.py                                  # CIFAR shapes, 10/25/50/100
  python benchmarks/recover.py --batch-sizes 10,25,50 --repeats 3   # what results/ holds for CPU
  python benchmarks/recover.py --preset imagenet --batch-sizes 25,50,100   # on a GPU

Writes ``benchmarks/results/recover_<preset>_<backend>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The benchmarks' helpers, and ddjax itself when it is not installed (a plain checkout).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import compiled_memory, environment, peak_memory_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {
    "cifar": {
        "image_shape": (32, 32, 3),
        "num_classes": 100,
        "small_stem": True,
        "crop": False,
        "flip": False,
        "jitter": (0, 4),
        "lr": 0.25,
        "r_bn": 0.01,
    },
    "tiny": {
        "image_shape": (64, 64, 3),
        "num_classes": 200,
        "small_stem": True,
        "crop": True,
        "flip": True,
        "jitter": (-4, 4),
        "lr": 0.1,
        "r_bn": 1.0,
    },
    "imagenet": {
        "image_shape": (224, 224, 3),
        "num_classes": 1000,
        "small_stem": False,
        "crop": True,
        "flip": True,
        "jitter": (0, 32),
        "lr": 0.25,
        "r_bn": 0.01,
    },
}
# The SRe2L figure the brief derives (research/sre2l.md §6.3): CDA's README reports about 29 h
# for ImageNet-1K IPC 50 (500 batches of 100 × 4,000 iterations) on one RTX 4090, which is
# about 52 ms per 100-image ResNet-18 iteration at 224 px.
SRE2L_IMAGENET_MS_PER_ITER_RTX4090 = 52


# --------------------------------------------------------------------------------------------
# Worker: one batch size in its own process
# --------------------------------------------------------------------------------------------


def worker(opts: dict) -> dict:
    """Compiles and times the recover step at one batch size; returns its JSON row."""
    import jax
    import numpy as np

    from ddjax import models
    from ddjax.sre2l import recover_step

    spec = PRESETS[opts["preset"]]
    shape, num_classes, batch = tuple(spec["image_shape"]), spec["num_classes"], opts["batch"]
    model = models.get_model(
        "ResNet18BN", num_classes, shape, small_stem=spec["small_stem"], width=opts["width"]
    )
    # rbg keys: the weights' values do not matter here, and threefry initialisation of
    # ResNet-18 compiles slowly on CPU (see ddjax.models.init_variables).
    variables = models.init_variables(model, jax.random.key(0, impl="rbg"), shape)
    settings = recover_step.RecoverSettings(
        iterations=1000,
        lr=spec["lr"],
        r_bn=spec["r_bn"],
        mean=(0.5,) * shape[-1],
        std=(0.25,) * shape[-1],
        crop=spec["crop"] if opts["crop"] is None else opts["crop"],
        flip=spec["flip"],
        jitter=tuple(spec["jitter"]),
    )
    labels = jax.numpy.asarray(np.arange(batch) % num_classes, jax.numpy.int32)
    state = recover_step.init_state(jax.random.key(1), batch, shape)
    rss_setup, _ = peak_memory_bytes()
    row = {"batch": batch, "load_before": os.getloadavg()[0]}

    step = recover_step.make_recover_step(model, settings)
    start = time.perf_counter()
    compiled = step.lower(state, variables, labels).compile()
    row["compile_s"] = time.perf_counter() - start
    row.update(compiled_memory(compiled))
    for _ in range(opts["warmup"]):
        state, metrics = compiled(state, variables, labels)
        jax.block_until_ready(state)
    times = []
    for _ in range(opts["repeats"]):
        start = time.perf_counter()
        state, metrics = compiled(state, variables, labels)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    peak, peak_kind = peak_memory_bytes()
    seconds = statistics.median(times)
    row.update(
        s_per_iter=seconds,
        iters_per_s=1.0 / seconds,
        images_per_s=batch / seconds,
        times=times,
        peak_bytes=peak,
        peak_kind=peak_kind,
        setup_peak_bytes=rss_setup,
        loss=float(metrics["loss"]),
        num_params=models.count_params(variables),
        load_after=os.getloadavg()[0],
    )
    return row


def _spawn(opts: dict, timeout_s: float) -> dict:
    """Runs one worker in a fresh Python process and returns its JSON row (or the failure)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(opts)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"batch": opts["batch"], "error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"batch": opts["batch"], "error": f"exit code {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f}"


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _markdown(report: dict) -> str:
    env, settings, rows = report["environment"], report["settings"], report["rows"]
    cpu = env["device"].startswith("cpu")
    peak_label = "peak RSS MiB" if cpu else "device peak MiB"
    lines = [
        f"# SRe2L recover: speed and memory vs batch size ({settings['preset']}, {env['device']})",
        "",
        f"Teacher ResNet18BN (width {settings['width']}, {settings['num_params']:,} parameters, "
        f"{'small-image' if settings['small_stem'] else 'ImageNet'} stem), images "
        f"{settings['image_shape']}, {settings['num_classes']} classes; augmentation per "
        f"iteration: crop {settings['crop']}, flip {settings['flip']}, roll "
        f"U{{{settings['jitter'][0]}..{settings['jitter'][1]}}}. One iteration = augmentation, "
        "teacher forward with BN-input statistics, loss, image gradient, Adam, clip. Median of "
        f"{settings['repeats']} timed iterations after {settings['warmup']} warm-up, each batch "
        f"size in a fresh process. Device: {env['device']} ({env['cpu_count']} cores), jax "
        f"{env['jax']}, flax {env['flax']}, optax {env['optax']}, python {env['python']}.",
        "",
        f"| batch | it / s | images / s | s / iter | temp MiB | args MiB | {peak_label} | "
        "compile s | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {_num(r.get('iters_per_s'), '.3g')} | "
            f"{_num(r.get('images_per_s'), '.3g')} | {_num(r.get('s_per_iter'), '.3g')} | "
            f"{_mib(r.get('temp_bytes'))} | {_mib(r.get('argument_bytes'))} | "
            f"{_mib(r.get('peak_bytes'))} | {_num(r.get('compile_s'), '.1f')} | "
            f"{r.get('error', '')} |"
        )
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["rows"] if "s_per_iter" in r]
    if not rows:
        return False
    batches = [r["batch"] for r in rows]
    fig, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_speed.plot(batches, [r["images_per_s"] for r in rows], marker="o", color="C0")
    ax_speed.set(xlabel="batch size", title="speed")
    ax_speed.set_ylabel("images / s", color="C0")
    ax_iters = ax_speed.twinx()  # iterations/s fall as images/s rise: one axis each
    ax_iters.plot(batches, [r["iters_per_s"] for r in rows], marker="s", color="C1")
    ax_iters.set_ylabel("iterations / s", color="C1")
    ax_memory.plot(batches, [r["temp_bytes"] / 2**20 for r in rows], marker="o", label="temp")
    peak_label = "peak RSS" if report["environment"]["device"].startswith("cpu") else "peak"
    ax_memory.plot(batches, [r["peak_bytes"] / 2**20 for r in rows], marker="s", label=peak_label)
    ax_memory.set(xlabel="batch size", ylabel="MiB", title="memory")
    ax_memory.legend()
    fig.suptitle(
        f"SRe2L recover, {report['settings']['preset']}, {report['environment']['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cifar")
    parser.add_argument("--batch-sizes", default="10,25,50,100")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 published)")
    parser.add_argument("--crop", choices=("preset", "on", "off"), default="preset")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per batch size")
    parser.add_argument(
        "--out", default="", help="output stem (default recover_<preset>_<backend>)"
    )
    parser.add_argument("--render", help="rewrite the .md and .png of a saved .json report")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.render:
        path = Path(args.render)
        report = json.loads(path.read_text())
        path.with_suffix(".md").write_text(_markdown(report))
        _plot(report, path.with_suffix(".png"))
        return 0

    import jax

    spec = PRESETS[args.preset]
    crop = {"preset": None, "on": True, "off": False}[args.crop]
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",") if b):
        opts = {
            "preset": args.preset,
            "batch": batch,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "width": args.width,
            "crop": crop,
        }
        row = _spawn(opts, args.timeout)
        rows.append(row)
        print(
            f"batch {batch}: "
            + (
                row["error"]
                if "error" in row
                else f"{row['iters_per_s']:.3g} it/s, {row['images_per_s']:.3g} images/s, "
                f"temp {row['temp_bytes'] / 2**20:,.0f} MiB, peak {row['peak_bytes'] / 2**20:,.0f}"
                f" MiB, compile {row['compile_s']:.1f} s"
            ),
            flush=True,
        )
    num_params = next((r["num_params"] for r in rows if "num_params" in r), 0)
    report = {
        "environment": environment(),
        "settings": {
            "preset": args.preset,
            "image_shape": list(spec["image_shape"]),
            "num_classes": spec["num_classes"],
            "small_stem": spec["small_stem"],
            "width": args.width,
            "num_params": num_params,
            "crop": spec["crop"] if crop is None else crop,
            "flip": spec["flip"],
            "jitter": list(spec["jitter"]),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "rows": rows,
        "notes": [
            "Iterations of one batch are independent of the batch's content; the teacher's "
            "weights are PyTorch-default initial ones.",
            "temp = XLA's compiled temporary buffers of one step (activations kept for the "
            "backward pass, the crop's resampling matrices, Adam's update); args = the state "
            "(images, Adam moments), the teacher and the labels.",
            "Reference (brief §6.3, derived): SRe2L's ImageNet recover takes about "
            f"{SRE2L_IMAGENET_MS_PER_ITER_RTX4090} ms per 100-image ResNet-18 iteration at 224 px "
            "on one RTX 4090 (CDA README: IN-1K IPC 50 in about 29 h).",
            "Load average before/after each batch size (2-core machines are often shared): "
            + ", ".join(
                f"{r['batch']}: {r['load_before']:.1f}/{r['load_after']:.1f}"
                for r in rows
                if "load_after" in r
            )
            + ".",
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or f"recover_{args.preset}_{jax.default_backend()}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(_markdown(report))
    plotted = _plot(report, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.json, .md" + (", .png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
