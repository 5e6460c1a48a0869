r"""Memory and speed of one trajectory-matching iteration, per gradient mode and N.

One iteration is :func:`ddjax.distill.matching.match_loss_and_grads`: the student starts at the
expert's parameters, takes N SGD steps on the *whole* synthetic set (IPC 10, so 100 images; MTT's
``batch_syn`` = 100), with DSA on every step, and the matching loss is differentiated w.r.t. the
images and the learnable learning rate -- in each gradient mode (``unroll`` = MTT's plain
second-order backprop, ``remat`` = checkpointed steps, ``tesla`` = TESLA's estimator). Reported
per (N, mode), each in a fresh subprocess so that the process's peak memory is its own:

* seconds per iteration: median of ``--repeats`` timed calls after one warm-up call
  (``block_until_ready``), and the process CPU seconds of the same calls;
* compiled memory from ``jax.jit(...).lower(...).compile().memory_analysis()`` (temp, arguments,
  outputs). Lowering uses ``jax.ShapeDtypeStruct`` arguments, so it allocates nothing and also
  works for configurations that could never run here;
* peak memory: the process's peak resident set size (``ru_maxrss``) on CPU, the device's
  ``peak_bytes_in_use`` on GPU (with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``);
* the ratio of one iteration to N plain first-order training steps (``ddjax.train``: SGD, DSA,
  the same 100 images) -- what differentiating through training costs relative to training;
* compile time and the loop form (``ddjax.distill.matching`` ``loop``).

A configuration is timed only if N is in ``--run-ns`` (default: the smallest N on CPU, where one
``unroll`` iteration at N = 10 takes minutes, every N elsewhere) and its compiled temp memory is
at most ``--max-run-temp-gib``; the others are reported memory-only (time null, with the reason).
Start and target parameters are the PyTorch-default initialisation and a perturbed copy
(θ* + 0.01·ε·(|θ*| + 0.01), ε ~ N(0, 1)): the cost of an iteration does not depend on their
values. ``--aot-loop`` (default ``rolled``) is the loop form of the memory-only rows: on CPU an
unrolled N = 80 program takes minutes to compile, a rolled one seconds, with the same memory
behaviour (remat/tesla flat, unroll linear); timed rows also record the ``--aot-loop`` form's
temp memory for comparison.

  python benchmarks/memory_speed.py --preset fashion_mnist          # CPU: N = 10 timed
  python benchmarks/memory_speed.py --run-ns 10 --repeats 3         # what results/ holds for CPU
  python benchmarks/memory_speed.py --preset cifar10                # on a GPU: every N timed

Writes ``benchmarks/results/memory_speed_<preset>_<backend>.{json,md,png}``. A section of the
Markdown headed "## XLA:CPU loop forms: findings" is kept when the file is rewritten.
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

# The benchmarks' helpers (a worker runs this file as a script, so its folder is on sys.path).
from _common import compiled_memory, environment, peak_memory_bytes

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("unroll", "remat", "tesla")
PRESETS = {
    # MTT's Fashion-MNIST ConvNet-3 (width 128, instance norm, 317,706 parameters): the setting of
    # the PyTorch yardstick in research/peer_mtt_cpu.md.
    "fashion_mnist": {"image_shape": (28, 28, 1), "num_classes": 10},
    "cifar10": {"image_shape": (32, 32, 3), "num_classes": 10},
}
IPC = 10
WIDTH = 128
INNER_LR = 0.01
PRESERVED_HEADING = "## XLA:CPU loop forms: findings"

# The official MTT code on the project's kind of CPU (research/peer_mtt_cpu.md): Fashion-MNIST,
# ConvNet-3 width 128, IPC 10, DSA on, PyTorch 2.13 on 2 threads. N: (batch_syn, s/iter, peak RSS
# GB). N = 80 with the full batch of 100 would need about 26 GB and does not fit in 24 GiB.
MTT_PYTORCH_CPU = {
    10: (100, 13.6, 3.8),
    20: (100, 28.9, 6.9),
    40: (100, 58.1, 13.3),
    80: (50, 42.1, 15.2),
}


# --------------------------------------------------------------------------------------------
# Worker: one configuration in its own process
# --------------------------------------------------------------------------------------------


def _problem(preset: str, num_steps: int, conv_grad: str = "fast"):
    """Images, labels, start/target params and the schedule of one iteration (as arrays)."""
    import jax
    import jax.numpy as jnp

    from ddjax import models
    from ddjax.distill import matching

    spec = PRESETS[preset]
    shape, num_classes = spec["image_shape"], spec["num_classes"]
    model = models.get_model("ConvNet", num_classes, shape, conv_grad=conv_grad, width=WIDTH)
    start = models.init_variables(model, jax.random.key(0), shape)["params"]
    leaves, treedef = jax.tree.flatten(start)
    noise_keys = jax.random.split(jax.random.key(1), len(leaves))
    target = jax.tree.unflatten(
        treedef,
        [
            p + 0.01 * jax.random.normal(k, p.shape, p.dtype) * (jnp.abs(p) + 0.01)
            for p, k in zip(leaves, noise_keys, strict=True)
        ],
    )
    num_images = IPC * num_classes
    images = jax.random.normal(jax.random.key(2), (num_images, *shape), jnp.float32)
    labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), IPC)
    # The full synthetic set at every step: batch_syn = number of images.
    indices, mask = matching.inner_batch_indices(
        jax.random.key(3), num_images, num_images, num_steps
    )
    args = (images, labels, jnp.float32(INNER_LR), start, target, indices, mask)
    return model, args, jax.random.key(4)


def _compile(model, args, key, mode: str, loop):
    """AOT-compiles one iteration for abstract arguments; returns (compiled, seconds, memory)."""
    import jax

    from ddjax.distill import matching

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (args, key))
    start = time.perf_counter()
    inner = matching.InnerLoop(model, mode=mode, loop=loop)
    compiled = matching.match_loss_and_grads.lower(
        *abstract[0], inner=inner, augment_key=abstract[1]
    ).compile()
    seconds = time.perf_counter() - start
    return compiled, seconds, compiled_memory(compiled)


def worker_match(opts: dict) -> dict:
    """Compiles (and, if allowed, times) one (N, mode) configuration; returns its JSON row."""
    import jax

    num_steps, mode, loop = opts["n"], opts["mode"], _loop_value(opts["loop"])
    model, args, key = _problem(opts["preset"], num_steps, opts["conv_grad"])
    rss_setup, _ = peak_memory_bytes()
    row = {"n": num_steps, "mode": mode, "loop": opts["loop"], "load_before": os.getloadavg()[0]}

    if opts["aot_loop"] != opts["loop"]:
        _, seconds, memory = _compile(model, args, key, mode, _loop_value(opts["aot_loop"]))
        row["aot_loop"] = opts["aot_loop"]
        row["aot_loop_temp_bytes"] = memory["temp_bytes"]
        row["aot_loop_compile_s"] = seconds

    compiled, seconds, memory = _compile(model, args, key, mode, loop)
    row.update(memory, compile_s=seconds)
    limit = opts["max_run_temp_gib"] * 2**30
    if not opts["run"]:
        row["skipped"] = "memory only (N not in --run-ns)"
    elif memory["temp_bytes"] > limit:
        row["skipped"] = (
            f"memory only: compiled temp {memory['temp_bytes'] / 2**30:.1f} GiB exceeds "
            f"--max-run-temp-gib {opts['max_run_temp_gib']}"
        )
    if "skipped" in row:
        return row

    def call():
        return jax.block_until_ready(compiled(*args, augment_key=key))

    start = time.perf_counter()
    loss, grads = call()  # warm-up: first execution (allocations, thread pools)
    row["warmup_s"] = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(opts["repeats"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak, peak_kind = peak_memory_bytes()
    row.update(
        s_per_iter=statistics.median(times),
        cpu_s_per_iter=statistics.median(cpu_times),
        times=times,
        peak_bytes=peak,
        peak_kind=peak_kind,
        setup_peak_bytes=rss_setup,
        loss=float(loss),
        image_grad_norm=float(jax.numpy.linalg.norm(grads.images)),
        load_after=os.getloadavg()[0],
    )
    return row


def worker_train(opts: dict) -> dict:
    """Times N plain training steps (SGD, DSA, the same 100 images), median over repeats."""
    import jax

    from ddjax import augment, train

    model, args, key = _problem(opts["preset"], 1, opts["conv_grad"])
    images, labels = args[0], args[1]
    spec = PRESETS[opts["preset"]]
    tx = train.sgd(INNER_LR)
    step = jax.jit(train.make_train_step(model, tx, augment.make_augment("dsa")))
    state = train.init_state(model, tx, jax.random.key(0), spec["image_shape"])
    start = time.perf_counter()
    state, loss = jax.block_until_ready(step(state, images, labels, key))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(opts["repeats"]):
        start = time.perf_counter()
        for i in range(opts["n"]):
            state, loss = step(state, images, labels, jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return {
        "n": opts["n"],
        "s_per_n_steps": statistics.median(times),
        "times": times,
        "compile_s": compile_s,
    }


def _loop_value(loop: str):
    return int(loop) if loop.isdigit() else loop


def _spawn(kind: str, opts: dict, timeout_s: float) -> dict:
    """Runs one worker in a fresh Python process and returns its JSON row (or the failure)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(opts)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit code {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f}"


def _fmt(value, digits=1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _seconds(value) -> str:
    """Seconds with about three significant digits (GPU iterations take milliseconds)."""
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


_CONV_GRAD = {
    "fast": "ddjax's (`get_model(..., conv_grad='fast')`, on CPU)",
    "xla": "XLA's own",
}


def _markdown(report: dict, out: Path) -> str:
    env, settings, rows = report["environment"], report["settings"], report["rows"]
    cpu = env["device"].startswith("cpu")
    peak_label = "peak RSS GiB" if cpu else "device peak GiB"
    lines = [
        f"# Trajectory-matching iteration: memory and speed ({settings['preset']}, "
        f"{env['device']})",
        "",
        f"{settings['model']}, {settings['images']} synthetic images {settings['image_shape']} "
        f"(IPC {IPC}), the full set at every inner step, DSA on every step; start/target "
        f"parameters: {settings['expert_params']}. Device: {env['device']} "
        f"({env['cpu_count']} cores), jax {env['jax']}, flax {env['flax']}, python "
        f"{env['python']}. Loop form: `{settings['loop']}` for timed rows, `{settings['aot_loop']}`"
        f" for memory-only rows. Median of {settings['repeats']} timed iterations after one "
        "warm-up, each configuration in a fresh process. XLA_FLAGS: "
        f"`{settings['xla_flags'] or '(none)'}`. Convolution gradients: "
        f"{_CONV_GRAD[settings.get('conv_grad', 'xla')]}.",
        "",
        "| N | mode | s / iter | CPU s / iter | temp MiB (loop) | "
        f"{peak_label} | ratio to N train steps | compile s | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loop = r.get("loop", "")
        ratio = r.get("ratio_to_train_steps")
        temp = f"{_mib(r.get('temp_bytes'))} ({loop})"
        if "aot_loop_temp_bytes" in r:
            temp += f"; {_mib(r['aot_loop_temp_bytes'])} ({r['aot_loop']})"
        peak = r.get("peak_bytes")
        lines.append(
            f"| {r['n']} | {r['mode']} | {_seconds(r.get('s_per_iter'))} | "
            f"{_seconds(r.get('cpu_s_per_iter'))} | {temp} | "
            f"{'–' if peak is None else f'{peak / 2**30:.2f}'} | "
            f"{'–' if ratio is None else f'{ratio:.1f}x'} | {_fmt(r.get('compile_s'))} | "
            f"{r.get('skipped') or r.get('error') or ''} |"
        )
    train_rows = report.get("train_steps", [])
    if train_rows:
        lines += ["", "Plain training (SGD, DSA, the same 100 images), seconds for N steps: "]
        lines[-1] += (
            ", ".join(f"N = {t['n']}: {_seconds(t.get('s_per_n_steps'))}" for t in train_rows) + "."
        )
    if settings["preset"] == "fashion_mnist":
        lines += [
            "",
            "The official MTT code (PyTorch 2.13, CPU, 2 threads, DSA on, "
            "`research/peer_mtt_cpu.md`) on the same kind of machine, one iteration of full "
            "second-order backprop (like `unroll`):",
            "",
            "| N | batch_syn | s / iter | peak RSS GB |",
            "|---|---|---|---|",
        ]
        for n, (batch, seconds, rss) in MTT_PYTORCH_CPU.items():
            lines.append(f"| {n} | {batch} | {seconds} | {rss} |")
        lines.append("| 80 | 100 | – | ≈ 26 (does not fit in 24 GiB) |")
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in report.get("notes", [])]
    setup = report.get("setup_rss_gib")
    lines += [
        "- temp MiB is XLA's compiled temporary buffer size (`memory_analysis()`), i.e. the "
        "activations and residuals of the program; arguments and outputs are in the JSON.",
    ]
    if cpu:
        loads = [r[k] for r in rows for k in ("load_before", "load_after") if r.get(k)]
        lines += [
            "- The peak RSS includes the Python process, JAX and the compiled code (about "
            f"{_fmt(setup, 2)} GiB before compiling).",
            "- Wall-clock times on a shared machine vary with its load (here a 1-minute load "
            + (f"average of {min(loads):.1f}-{max(loads):.1f}" if loads else "average not known")
            + f" on {env['cpu_count']} cores, from the other jobs sharing it): the JSON records "
            "the load before and after every configuration; CPU s / iter is the process's CPU "
            "time per iteration (up to cores x wall time when it has the machine to itself).",
        ]
    else:
        lines += [
            "- The device peak is `memory_stats()['peak_bytes_in_use']` of a fresh process "
            "(no preallocation); it includes the arguments and outputs. CPU s / iter is the "
            "host process's CPU time.",
        ]
    text = "\n".join(lines) + "\n"
    # Keep a hand-written findings section across reruns.
    if out.with_suffix(".md").exists():
        old = out.with_suffix(".md").read_text()
        if PRESERVED_HEADING in old:
            text += "\n" + old[old.index(PRESERVED_HEADING) :]
    return text


def _plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, env = report["rows"], report["environment"]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    markers = {"unroll": "o", "remat": "s", "tesla": "^"}
    colors = {"unroll": "C0", "remat": "C1", "tesla": "C2"}
    aot_loop = report["settings"]["aot_loop"]
    for mode in MODES:
        sub = [r for r in rows if r["mode"] == mode and r.get("temp_bytes") is not None]
        # One loop form per line: the memory-only form, which every row has compiled.
        same_form = [
            (r["n"], r["aot_loop_temp_bytes"] if "aot_loop_temp_bytes" in r else r["temp_bytes"])
            for r in sub
            if "aot_loop_temp_bytes" in r or r["loop"] == aot_loop
        ]
        if same_form:
            ax_mem.plot(
                [n for n, _ in same_form],
                [b / 2**30 for _, b in same_form],
                markers[mode] + "-",
                color=colors[mode],
                label=f"{mode}: compiled temp ({aot_loop})",
            )
        other_form = [r for r in sub if r["loop"] != aot_loop]
        if other_form:
            ax_mem.plot(
                [r["n"] for r in other_form],
                [r["temp_bytes"] / 2**30 for r in other_form],
                markers[mode],
                color=colors[mode],
                ms=4,
                label=f"{mode}: compiled temp ({other_form[0]['loop']})",
            )
        peak = [r for r in sub if r.get("peak_bytes") is not None]
        if peak:
            ax_mem.plot(
                [r["n"] for r in peak],
                [r["peak_bytes"] / 2**30 for r in peak],
                markers[mode],
                color=colors[mode],
                mfc="none",
                ms=10,
                label=f"{mode}: {peak[0]['peak_kind']}",
            )
        timed = [r for r in sub if r.get("s_per_iter") is not None]
        if timed:
            ax_time.plot(
                [r["n"] for r in timed],
                [r["s_per_iter"] for r in timed],
                markers[mode] + "-",
                color=colors[mode],
                label=mode,
            )
    if report["settings"]["preset"] == "fashion_mnist" and env["device"].startswith("cpu"):
        full = {n: v for n, v in MTT_PYTORCH_CPU.items() if v[0] == 100}
        ax_mem.plot(
            list(full),
            [v[2] / 1.073741824 for v in full.values()],
            "kx--",
            label="MTT PyTorch: peak RSS",
        )
        ax_time.plot(list(full), [v[1] for v in full.values()], "kx--", label="MTT PyTorch")
    ax_mem.set_xlabel("inner steps N")
    ax_mem.set_ylabel("GiB")
    ax_mem.set_yscale("log")
    ax_mem.set_title("memory per iteration")
    ax_mem.legend(fontsize=7)
    ax_time.set_xlabel("inner steps N")
    ax_time.set_ylabel("seconds per iteration")
    ax_time.set_title(f"time per iteration ({env['device']})")
    ax_time.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fashion_mnist")
    parser.add_argument("--ns", default="10,20,40,80", help="inner steps N, comma-separated")
    parser.add_argument(
        "--run-ns", default="auto", help="N to time (default: the smallest on CPU, else all)"
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--loop",
        default="auto",
        help="'unrolled', 'rolled', an int, or 'auto' (unrolled on CPU, rolled elsewhere)",
    )
    parser.add_argument("--aot-loop", default="rolled", help="loop form of the memory-only rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-run-temp-gib", type=float, default=12.0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument(
        "--conv-grad",
        choices=("fast", "xla"),
        default="fast",
        help="CPU convolution gradients: ddjax's or XLA's own (get_model's conv_grad)",
    )
    parser.add_argument("--note", action="append", default=[], help="a line for the Markdown")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--render", metavar="JSON", help="only rewrite the .md and .png of an existing report"
    )
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, opts = args.worker[0], json.loads(args.worker[1])
        row = worker_match(opts) if kind == "match" else worker_train(opts)
        print(json.dumps(row), flush=True)
        return

    if args.render:
        out = Path(args.render).with_suffix("")
        report = json.loads(out.with_suffix(".json").read_text())
        _write_report(report, out, json_too=False)
        return

    import jax

    backend = jax.default_backend()
    loop = args.loop if args.loop != "auto" else ("unrolled" if backend == "cpu" else "rolled")
    aot_loop = args.aot_loop
    ns = [int(n) for n in args.ns.split(",")]
    if args.run_ns == "auto":
        run_ns = {min(ns)} if backend == "cpu" else set(ns)
    else:
        run_ns = {int(n) for n in args.run_ns.split(",") if n}
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        if mode not in MODES:
            parser.error(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
    out = Path(args.out or RESULTS / f"memory_speed_{args.preset}_{backend}")
    spec = PRESETS[args.preset]

    rows, train_rows = [], []
    started = time.perf_counter()
    for n in ns:
        train_row = None
        for mode in modes:
            opts = {
                "preset": args.preset,
                "n": n,
                "mode": mode,
                "loop": loop if n in run_ns else aot_loop,
                "aot_loop": aot_loop,
                "repeats": args.repeats,
                "max_run_temp_gib": args.max_run_temp_gib,
                "run": n in run_ns,
                "conv_grad": args.conv_grad,
            }
            row = _spawn("match", opts, args.timeout)
            row = {"n": n, "mode": mode, "loop": opts["loop"], **row}
            if row.get("s_per_iter") is not None:
                if train_row is None:
                    train_row = _spawn(
                        "train",
                        {
                            "preset": args.preset,
                            "n": n,
                            "repeats": args.repeats,
                            "conv_grad": args.conv_grad,
                        },
                        args.timeout,
                    )
                    train_rows.append(train_row)
                if train_row.get("s_per_n_steps"):
                    row["ratio_to_train_steps"] = row["s_per_iter"] / train_row["s_per_n_steps"]
            rows.append(row)
            print(
                f"N {n:3d} {mode:6s} [{row['loop']}]: "
                f"s/iter {_seconds(row.get('s_per_iter')):>7s}  "
                f"temp {_mib(row.get('temp_bytes')):>8s} MiB  "
                f"peak {_mib(row.get('peak_bytes')):>8s} MiB  "
                f"ratio {_fmt(row.get('ratio_to_train_steps'), 1):>5s}  "
                f"compile {_fmt(row.get('compile_s'), 1):>6s} s  "
                f"{row.get('skipped') or row.get('error') or ''}",
                flush=True,
            )
    setup = [r["setup_peak_bytes"] for r in rows if r.get("setup_peak_bytes")]
    report = {
        "benchmark": "memory_speed",
        "settings": {
            "preset": args.preset,
            "model": f"ConvNet-3 width {WIDTH}, instance norm, avg pooling",
            "image_shape": list(spec["image_shape"]),
            "images": IPC * spec["num_classes"],
            "ipc": IPC,
            "batch_syn": IPC * spec["num_classes"],
            "dsa": "on (MTT's default strategy), a fresh draw per inner step",
            "inner_lr": INNER_LR,
            "expert_params": "PyTorch-default init and a copy perturbed by "
            "0.01·N(0,1)·(|θ|+0.01) (values do not affect cost)",
            "loop": loop,
            "aot_loop": aot_loop,
            "repeats": args.repeats,
            "statistic": "median seconds per iteration after one warm-up call",
            "max_run_temp_gib": args.max_run_temp_gib,
            "run_ns": sorted(run_ns),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "conv_grad": args.conv_grad,
            "wall_s": time.perf_counter() - started,
        },
        "environment": environment(),
        "mtt_pytorch_cpu": {
            str(k): dict(zip(("batch_syn", "s_per_iter", "peak_rss_gb"), v, strict=True))
            for k, v in MTT_PYTORCH_CPU.items()
        },
        "notes": args.note,
        "setup_rss_gib": min(setup) / 2**30 if setup else None,
        "rows": rows,
        "train_steps": train_rows,
    }
    _write_report(report, out, json_too=True)


def _write_report(report: dict, out: Path, *, json_too: bool) -> None:
    """Writes ``out``.json (optionally), .md and .png, and prints the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if json_too:
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = _markdown(report, out)
    out.with_suffix(".md").write_text(markdown)
    _plot(report, out)
    print()
    print(markdown.split(PRESERVED_HEADING)[0])
    written = [out.with_suffix(".md"), out.with_suffix(".png")]
    if json_too:
        written.insert(0, out.with_suffix(".json"))
    print("wrote " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    main()
