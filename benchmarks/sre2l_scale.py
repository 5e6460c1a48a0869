r"""SRe2L at ImageNet scale: throughput and peak memory of recover, relabel, KD and validation.

On a generated ImageNet-layout dataset (1,000 classes of smooth random colour fields, a few
JPEGs each: nothing is downloaded) and generated synthetic folders, each measurement runs in a
fresh process and reports its time and its peak resident memory (``VmHWM``):

* **recover**: ImageNet's recover iteration (ResNet-18 teacher at random initialisation, 224 px,
  the published multi-crop, r_bn 0.01 with the first-BN x10, Adam, clipping) on the first
  ``--recover-batches`` batches of the IPC 1 and IPC 4 plans, each finished batch written as
  JPEG files (:mod:`ddjax.synfolder`). Memory depends on the batch, not on the IPC.
* **relabel**: the second epoch of FKD labels (RandomResizedCrop + flip + CutMix, fp16 logits)
  over a synthetic folder of IPC 1 and IPC 4 (1,000 and 4,000 images), read batch by batch.
* **kd**: one student step (ResNet-18, AdamW, KD at T = 20) on views of a folder batch.
* **val**: top-1 of a ResNet-18 on the streamed val split (resize 256, centre crop 224) of the
  generated dataset at 1x and 4x its size. Memory must not grow with the dataset.

  python benchmarks/sre2l_scale.py --dir /tmp/ddjax-scale              # this CPU's defaults
  python benchmarks/sre2l_scale.py --dir /data/scale --batch 100 --kd-batch 256   # a GPU

Writes ``benchmarks/results/sre2l_scale_<platform>.{json,md,png}``. The GPU side-by-side with
the official SRe2L code is issue 14's ``benchmarks/vs_pytorch.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402
from input_pipeline import natural_image  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = 1000
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Generated data
# --------------------------------------------------------------------------------------------


def make_imagenet_like(root: Path, classes: int, train: int, val: int, seed: int = 0) -> Path:
    """``root/train/nXXXXXXXX/*.JPEG`` and ``root/val/...``: ImageNet's layout, random content.

    Images are about 300x250 pixels (ImageNet's are ~400x350; smaller keeps generation quick),
    JPEG quality 90. Written once: a folder with its ``COMPLETE`` marker is reused.
    """
    done = root / "COMPLETE"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for split, count in (("train", train), ("val", val)):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = (300, 250) if rng.random() < 0.5 else (250, 300)
                pixels = natural_image(rng, width, height)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", quality=90)
    done.write_text("ok\n")
    return root


def make_synthetic_folder(root: Path, classes: int, ipc: int, size: int) -> Path:
    """A finished synthetic folder of random normalised images (JPEG q75, as recover writes)."""
    from ddjax import synfolder

    if (root / "COMPLETE").exists():
        return root
    writer = synfolder.SynFolderWriter(
        root, num_classes=classes, ipc=ipc, image_shape=(size, size, 3), mean=MEAN, std=STD
    )
    rng = np.random.default_rng(ipc)
    for ipc_id in range(ipc):
        for first in range(0, classes, 100):
            labels = np.arange(first, min(first + 100, classes))
            images = rng.normal(0, 1, (len(labels), size, size, 3)).astype(np.float32)
            writer.write_batch(ipc_id * 100 + first // 100, labels, np.full_like(labels, ipc_id),
                               images)  # fmt: skip
    (root / "COMPLETE").write_text("ok\n")
    return root


# --------------------------------------------------------------------------------------------
# Measurements (each in its own process)
# --------------------------------------------------------------------------------------------


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _teacher(size: int):
    import jax

    from ddjax import models

    net = models.get_model("ResNet18BN", CLASSES, (size, size, 3), small_stem=False)
    variables = models.init_variables(net, jax.random.key(0), (size, size, 3))
    return net, variables


def task_recover(args: dict) -> dict:
    import jax

    from ddjax import synfolder
    from ddjax.config import import_config
    from ddjax.sre2l import recover, recover_step
    from ddjax.sre2l.contract import DataContract

    size = args["size"]
    net, variables = _teacher(size)
    config = import_config("recover/sre2l.py").get_config("imagenet")
    config.jitter = (0, 32 * size // 224)  # the published roll range, scaled for quick runs
    contract = DataContract("imagenet", (size, size, 3), CLASSES, MEAN, STD)
    settings = recover.settings_from_config(config, contract)
    settings = dataclasses.replace(settings, iterations=args["iterations"])
    plan = recover_step.plan_batches(CLASSES, args["ipc"], args["batch"], "distinct_classes")
    writer = synfolder.SynFolderWriter(
        Path(args["out"]), num_classes=CLASSES, ipc=args["ipc"], image_shape=(size, size, 3),
        mean=MEAN, std=STD,
    )  # fmt: skip
    step = recover_step.make_recover_step(net, settings)
    per_iteration = []
    start = time.perf_counter()
    for index, batch in enumerate(plan[: args["batches"]]):
        began = time.perf_counter()
        images, _ = recover_step.recover_batch(
            step, variables, batch.classes, jax.random.fold_in(jax.random.key(0), index),
            settings, (size, size, 3),
        )  # fmt: skip
        writer.write_batch(index, batch.classes, batch.ipc_ids, images)
        per_iteration.append((time.perf_counter() - began) / settings.iterations)
    total = time.perf_counter() - start
    seconds = float(np.median(per_iteration[1:]))  # the first batch compiles the step
    return {
        "seconds_per_iteration": seconds,
        "images_per_second": args["batch"] / seconds,
        "planned_batches": len(plan),
        "total_seconds": total,
    }


def task_relabel(args: dict) -> dict:
    from ddjax import synfolder
    from ddjax.sre2l import label_store, views
    from ddjax.sre2l.contract import DataContract
    from ddjax.sre2l.teacher import Teacher

    size = args["size"]
    net, variables = _teacher(size)
    folder = synfolder.open_synfolder(args["folder"])
    contract = DataContract("imagenet", (size, size, 3), CLASSES, MEAN, STD)
    epochs: list[float] = []
    summary = label_store.write_store(
        Path(args["out"]), folder, Teacher(net, variables, {}), contract,
        spec=views.AugmentSpec(), epochs=2, batch_size=args["batch"], seed=42,
        log=lambda **event: epochs.append(event["seconds"]),
    )  # fmt: skip
    seconds = epochs[-1]  # the first epoch compiles the labeller
    return {
        "images": len(folder),
        "seconds": seconds,
        "images_per_second": len(folder) / seconds,
        "storage_bytes_per_epoch": summary["storage_bytes"] // 2,
    }


def task_kd(args: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from ddjax import models, synfolder, train
    from ddjax.sre2l import kd, views

    size, batch = args["size"], args["batch"]
    net = models.get_model("ResNet18BN", CLASSES, (size, size, 3), small_stem=False)
    recipe = kd.get_recipe("imagenet", batch_size=batch)
    tx, step = kd._steps(net, recipe)
    state = train.init_state(net, tx, jax.random.key(1), (size, size, 3))
    folder = synfolder.open_synfolder(args["folder"])
    spec = views.AugmentSpec()
    augment = views.augmenter(spec)
    step = jax.jit(step, donate_argnums=0)
    times = []
    batches = [
        (e, b, i)
        for e in range(args["steps"])
        for b, i in enumerate(views.batch_map(len(folder), batch, 42, e))
        if len(i) == batch
    ]
    for epoch, b, indices in batches[: args["steps"]]:
        drawn = views.draw_augment(views.batch_key(42, epoch, b), spec, batch, size, size)
        images = augment(views.gather(folder.images, indices), drawn)
        logits = jnp.zeros((len(indices), CLASSES), jnp.float32)
        start = time.perf_counter()
        state, loss = step(state, images, logits, jax.random.key(b))
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    return {
        "seconds_per_step": float(np.median(times[1:])),
        "images_per_second": batch / float(np.median(times[1:])),
    }


def task_val(args: dict) -> dict:
    import jax

    from ddjax import data, evaluate, models, train

    stream = data.open_stream(
        f"stream:folder:{args['root']}", image_size=args["size"], normalisation="imagenet"
    )
    size = args["size"]
    net = models.get_model("ResNet18BN", CLASSES, (size, size, 3), small_stem=False)
    tx = train.sgd(0.1)
    state = train.init_pool(net, tx, jax.random.key(0), (size, size, 3), 1)
    evaluate.pool_test_accuracy(net, state, stream, batch_size=args["batch"])  # compiles
    start = time.perf_counter()
    accuracy, _ = evaluate.pool_test_accuracy(net, state, stream, batch_size=args["batch"])
    seconds = time.perf_counter() - start
    images = len(stream.test)
    return {
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds,
        "top1": float(accuracy[0]),
    }


TASKS = {"recover": task_recover, "relabel": task_relabel, "kd": task_kd, "val": task_val}


def _run(task: str, **args) -> dict:
    """Runs one measurement in a fresh process; its result plus its peak memory (MiB)."""
    out = subprocess.run(
        [sys.executable, __file__, "--task", task, "--args", json.dumps(args)],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        sys.exit(f"{task} {args} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {task} {args}: {result}", flush=True)
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def _markdown(report: dict) -> str:
    env = report["environment"]
    rows = [
        f"# SRe2L at ImageNet scale ({env['device']}, {env.get('cpu_model', '')})",
        "",
        f"{report['settings']}; jax {env.get('jax')}, {env.get('cpu_count')} cores. Each row is "
        "one fresh process; memory is its peak resident set (VmHWM). Throughput is after "
        "compilation (recover: batches after the first; relabel: the second epoch; val: a "
        "second pass). The machine is shared: throughputs are noisy, memory is not."
        + (f" {report['note']}" if report.get("note") else ""),
        "",
        "| stage | size | throughput | time | peak memory |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        rows.append(
            f"| {row['stage']} | {row['size']} | {row['images_per_second']:.1f} img/s | "
            f"{row['time']} | {row['peak_mib']:.0f} MiB |"
        )
    rows += ["", report["flat"], ""]
    return "\n".join(rows)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['stage']}\n{r['size']}" for r in report["rows"]]
    axis.bar(range(len(labels)), [r["peak_mib"] for r in report["rows"]], color="#4477aa")
    axis.set_xticks(range(len(labels)), labels, fontsize=7)
    axis.set_ylabel("peak memory (MiB)")
    axis.set_title("SRe2L stages: peak memory against data size (flat is good)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    global CLASSES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where generated data goes (reused)")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--classes", type=int, default=CLASSES)
    parser.add_argument("--batch", type=int, default=20, help="recover and relabel batch")
    parser.add_argument("--kd-batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=4, help="recover iterations a batch")
    parser.add_argument("--recover-batches", type=int, default=3)
    parser.add_argument("--train", type=int, default=1, help="train images a class at 1x")
    parser.add_argument("--val", type=int, default=1, help="val images a class at 1x")
    parser.add_argument(
        "--render", action="store_true", help="re-write the .md and .png from the saved .json"
    )
    parser.add_argument("--note", default="", help="a sentence added to the report")
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.task:
        args = json.loads(options.args)
        CLASSES = args.get("classes", CLASSES)
        result = TASKS[options.task](args)
        print(json.dumps({**result, "peak_mib": _peak_mib()}))
        return
    if options.render:
        for saved in RESULTS.glob("sre2l_scale_*.json"):
            report = json.loads(saved.read_text())
            report["environment"].setdefault("cpu_model", _cpu_model())
            report["note"] = options.note or report.get("note", "")
            saved.write_text(json.dumps(report, indent=2) + "\n")
            saved.with_suffix(".md").write_text(_markdown(report))
            _plot(report, saved.with_suffix(".png"))
        return
    CLASSES = options.classes
    base = Path(options.dir or tempfile.mkdtemp(prefix="ddjax-scale-"))
    size, classes = options.size, options.classes
    common = {"size": size, "classes": classes}
    rows = []
    for scale in (1, 4):
        root = make_imagenet_like(
            base / f"imagenet_x{scale}", classes, options.train * scale, options.val * scale
        )
        result = _run("val", root=str(root), batch=options.batch, **common)
        rows.append({"stage": "val (streamed)", "size": f"{result['images']} val images",
                     "time": f"{result['seconds']:.0f} s", **result})  # fmt: skip
    for ipc in (1, 4):
        out = Path(tempfile.mkdtemp(dir=base))
        result = _run("recover", ipc=ipc, batch=options.batch, iterations=options.iterations,
                      batches=options.recover_batches, out=str(out / "set"), **common)  # fmt: skip
        plan = f"IPC {ipc} plan ({result['planned_batches']} batches of {options.batch})"
        time_text = f"{result['seconds_per_iteration']:.2f} s/iteration"
        rows.append({"stage": "recover", "size": plan, "time": time_text, **result})
    for ipc in (1, 4):
        folder = make_synthetic_folder(base / f"synset_ipc{ipc}", classes, ipc, size)
        out = Path(tempfile.mkdtemp(dir=base))
        result = _run("relabel", folder=str(folder), batch=options.batch, out=str(out / "labels"),
                      **common)  # fmt: skip
        rows.append({"stage": "relabel (an epoch)", "size": f"IPC {ipc}: {result['images']} images",
                     "time": f"{result['seconds']:.0f} s", **result})  # fmt: skip
    result = _run("kd", folder=str(base / "synset_ipc1"), batch=options.kd_batch, steps=4,
                  **common)  # fmt: skip
    rows.append({"stage": "KD student step", "size": f"batch {options.kd_batch}",
                 "time": f"{result['seconds_per_step']:.2f} s/step", **result})  # fmt: skip

    def ratio(stage: str) -> float:
        peaks = [r["peak_mib"] for r in rows if r["stage"] == stage]
        return peaks[-1] / peaks[0]

    flat = (
        f"Peak memory at 4x / 1x: val {ratio('val (streamed)'):.2f}, recover (IPC 4 / 1) "
        f"{ratio('recover'):.2f}, relabel (IPC 4 / 1) {ratio('relabel (an epoch)'):.2f}."
    )
    report = {
        "environment": {**environment(), "cpu_model": _cpu_model()},
        "settings": f"{classes} classes, {size} px, batch {options.batch}, KD batch "
        f"{options.kd_batch}, recover {options.iterations} iterations x "
        f"{options.recover_batches} batches, ResNet-18 at random initialisation",
        "rows": rows,
        "flat": flat,
        "note": options.note,
    }
    platform = report["environment"]["device"].split(":")[0]
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"sre2l_scale_{platform}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(report))
    _plot(report, stem.with_suffix(".png"))
    print(_markdown(report))
    print(f"wrote {stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
