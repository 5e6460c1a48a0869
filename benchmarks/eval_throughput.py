r"""Evaluation throughput: K networks trained by ``vmap`` vs one after another.

(``ddjax.train`` pool modes ``'vmap'`` and ``'loop'``; ``'auto'`` picks by backend.)

Evaluating a synthetic set trains K fresh networks (K = 5 in MTT). ddjax trains
them as one ``vmap``-ed pool; the alternative, and what the PyTorch references
do, is to train them one after another. This benchmark times one training epoch
(MTT protocol: SGD momentum 0.9, DSA on every batch, batch 256) of a ConvNet on
a synthetic set of IPC x C images both ways and reports training images per
second (K x set size / seconds per epoch), median over repeats after warm-up.

  python benchmarks/eval_throughput.py                      # Fashion-MNIST shapes, CPU
  python benchmarks/eval_throughput.py --ipc 10 --models 1 5 10 --repeats 7

Writes ``benchmarks/results/eval_throughput.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import environment

from ddjax import augment, models, train

RESULTS = Path(__file__).resolve().parent / "results"


def time_call(fn, repeats: int) -> list[float]:
    """Seconds per call, after one warm-up (compilation) call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def bench(image_shape, num_classes, ipc, num_models, repeats, width=128, batch_size=256):
    rng = np.random.default_rng(0)
    n = ipc * num_classes
    images = jnp.asarray(rng.normal(size=(n, *image_shape)).astype(np.float32))
    labels = jnp.asarray(np.repeat(np.arange(num_classes), ipc).astype(np.int32))
    net = models.get_model("ConvNet", num_classes, image_shape, width=width)
    tx = train.sgd(0.01, momentum=0.9, weight_decay=5e-4)
    step = train.make_train_step(net, tx, augment.make_augment("dsa"))
    key = jax.random.key(0)
    keys = jax.random.split(key, num_models)

    pool_epoch = train.make_pool_epoch(step, batch_size)
    pool = {"state": train.init_pool(net, tx, key, image_shape, num_models)}

    def run_pool():
        pool["state"], loss = pool_epoch(pool["state"], images, labels, keys)
        return loss

    # One after another: ddjax's 'loop' pool mode (the CPU default), a Python loop over
    # jitted minibatch steps, model by model.
    epoch = train.make_loop_epoch(step, batch_size)
    singles = [train.init_state(net, tx, k, image_shape) for k in keys]

    def run_sequential():
        losses = []
        for i in range(num_models):
            singles[i], loss = epoch(singles[i], images, labels, keys[i])
            losses.append(loss)
        return losses

    pool_times = time_call(run_pool, repeats)
    seq_times = time_call(run_sequential, repeats)
    pool_s, seq_s = statistics.median(pool_times), statistics.median(seq_times)
    return {
        "ipc": ipc,
        "set_size": n,
        "num_models": num_models,
        "vmap_s_per_epoch": pool_s,
        "sequential_s_per_epoch": seq_s,
        "vmap_images_per_s": num_models * n / pool_s,
        "sequential_images_per_s": num_models * n / seq_s,
        "speedup": seq_s / pool_s,
        "vmap_times": pool_times,
        "sequential_times": seq_times,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS / "eval_throughput"))
    args = parser.parse_args()

    shape = (args.image_size, args.image_size, args.channels)
    rows = []
    for ipc in args.ipc:
        for k in args.models:
            row = bench(shape, args.classes, ipc, k, args.repeats, width=args.width)
            rows.append(row)
            print(
                f"IPC {ipc:3d} K {k:3d}: vmap {row['vmap_images_per_s']:9.1f} img/s, "
                f"sequential {row['sequential_images_per_s']:9.1f} img/s, x{row['speedup']:.2f}",
                flush=True,
            )
    report = {
        "benchmark": "eval_throughput",
        "settings": {
            "model": f"ConvNet width {args.width}, depth 3, instance norm",
            "image_shape": list(shape),
            "classes": args.classes,
            "optimizer": "SGD momentum 0.9, wd 5e-4",
            "augment": "DSA on every batch",
            "batch_size": 256,
            "repeats": args.repeats,
            "statistic": "median seconds per epoch after one warm-up epoch",
        },
        "environment": environment(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    env = report["environment"]
    lines = [
        "# Evaluation throughput: K models by vmap vs one after another",
        "",
        f"Device: {env['device']} ({env['cpu_count']} cores), jax {env['jax']}, "
        f"flax {env['flax']}. {report['settings']['model']}, images {shape}, "
        "DSA, batch 256; median of "
        f"{args.repeats} epochs after warm-up.",
        "",
        "| IPC | K | vmap img/s | sequential img/s | speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ipc']} | {r['num_models']} | {r['vmap_images_per_s']:.0f} | "
            f"{r['sequential_images_per_s']:.0f} | {r['speedup']:.2f}x |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for ipc in args.ipc:
        sub = [r for r in rows if r["ipc"] == ipc]
        ks = [r["num_models"] for r in sub]
        ax.plot(ks, [r["vmap_images_per_s"] for r in sub], "o-", label=f"vmap, IPC {ipc}")
        ax.plot(
            ks, [r["sequential_images_per_s"] for r in sub], "s--", label=f"sequential, IPC {ipc}"
        )
    ax.set_xlabel("models trained (K)")
    ax.set_ylabel("training images / s")
    ax.set_title(f"Evaluation throughput ({env['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.json')}, .md, .png")


if __name__ == "__main__":
    main()
