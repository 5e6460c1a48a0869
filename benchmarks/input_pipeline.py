r"""Input pipeline: ddjax's grain stream vs PyTorch's DataLoader on an ImageNet-layout folder.

Streaming ImageNet (``stream:folder:PATH``) decodes every JPEG, takes a torchvision
``RandomResizedCrop(224)`` and a horizontal flip, normalises and batches -- in grain worker
processes. This benchmark generates an ImageNet-layout folder of JPEGs (smooth random colour
fields with a little grain, about 500x375 pixels like ImageNet's, written once into ``--dir``)
and measures:

* **throughput**: training images per second of one epoch over the ``4N`` images (decode +
  RandomResizedCrop(224) + flip + normalise + batch), for ddjax's
  :class:`~ddjax.data.streaming.BatchIterator` and for ``torch.utils.data.DataLoader`` with the
  same number of worker processes. Each run is a fresh loader, one warm-up epoch (worker
  start-up) and one timed epoch; the two loaders take turns, ``--repeats`` runs each, and the
  median is reported (the machine may be shared: taking turns spreads the load over both). The
  DataLoader's dataset calls the very transform ddjax's workers run (ddjax's
  :class:`~ddjax.data.streaming.Transform`: PIL decode, crop, bilinear resize, flip, float32
  normalisation), so the two differ only in the loader: ordering, inter-process transfer,
  batching and, for ddjax, the copy onto the JAX device. torchvision (``ImageFolder`` +
  ``transforms``) is used instead when it can be imported; it cannot be installed here (no CPU
  build matching the installed torch), as the report says. torch runs with one intra-op
  thread (``torch.set_num_threads(1)``, what its workers use): with its default of one thread
  a core, collating a batch on a loaded 2-core machine took 5-11 ms an image (OpenMP threads
  contending with other jobs) instead of 0.4 ms.
* **peak memory** of one pass over ``N`` and over ``4N`` images (batches of
  ``--memory-batch-size``, so that both passes run long enough to fill every buffer), each in a
  fresh process: the resident set size of the process and all its worker processes, summed,
  sampled every 20 ms with psutil (pages shared between processes count once per process, so
  this overstates a little), and each process's own peak (``VmHWM`` in /proc/PID/status). It
  should not grow with the number of images.

  python benchmarks/input_pipeline.py --dir /tmp/ddjax-input-bench            # N = 512
  python benchmarks/input_pipeline.py --dir /data/bench --n 4096 --workers 0 4 8

Writes ``benchmarks/results/input_pipeline_cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE_SIZES = ((500, 375), (375, 500), (500, 333), (400, 300), (500, 400))  # ImageNet-like


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------


def natural_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random colour field (three octaves of upsampled noise) with a little grain."""
    image = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 1.0), (16, 0.5), (64, 0.25)):
        coarse = rng.integers(0, 256, (max(2, cells * height // width), cells, 3), np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        image += amplitude * np.asarray(smooth, np.float32)
    image = image / 1.75 + rng.normal(0, 5, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_folder(directory: Path, count: int, classes: int) -> Path:
    """``directory/imagenet_<count>``: train/<class>/*.JPEG (``count`` in all), val (1 a class).

    Written once; a folder that is already complete is reused.
    """
    root = directory / f"imagenet_{count}"
    done = root / "COMPLETE"
    if done.exists():
        return root
    rng = np.random.default_rng(count)
    for c in range(classes):
        for split, number in (("train", count // classes), ("val", 1)):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(number):
                width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
                pixels = natural_image(rng, width, height)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", quality=90)
    done.write_text("ok\n")
    return root


# --------------------------------------------------------------------------------------------
# The two loaders: one epoch iterator factory each
# --------------------------------------------------------------------------------------------

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ddjax_epochs(root: Path, batch_size: int, workers: int, epochs: int):
    """Batches of ``epochs`` epochs of ddjax's stream (one pipeline across epochs)."""
    from ddjax import data
    from ddjax.data.streaming import BatchIterator

    stream = data.open_stream(f"stream:folder:{root}", image_size=224, normalisation="imagenet")
    iterator = BatchIterator(stream, batch_size, num_epochs=epochs, worker_count=workers, seed=0)
    batches = iterator.batches_per_epoch
    return iterator, batches, lambda batch: batch.images.block_until_ready()


class _TorchFolder:
    """A map-style torch Dataset running ddjax's train transform on each file."""

    def __init__(self, root: Path):
        from ddjax.data.sources.folder import list_folder
        from ddjax.data.streaming import Transform

        listing = list_folder(str(root), held_out_split=False)
        self.paths, self.labels = listing.train.paths(), listing.train.labels
        self.transform = Transform(True, (224, 224, 3), None, MEAN, STD, False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        value = self.paths[index].read_bytes()
        image = self.transform(value, np.random.default_rng(), str(self.paths[index]))
        return image, int(self.labels[index])


def torch_dataset(root: Path):
    """torchvision's ImageFolder + transforms if importable, else :class:`_TorchFolder`."""
    try:
        import torchvision
        from torchvision import transforms
    except ImportError:
        return _TorchFolder(root), "Dataset calling ddjax's Transform (torchvision not importable)"
    pipeline = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=pipeline)
    return dataset, f"torchvision {torchvision.__version__} ImageFolder + transforms"


def torch_epochs(root: Path, batch_size: int, workers: int, epochs: int):
    """Batches of ``epochs`` epochs of a shuffling torch DataLoader (persistent workers)."""
    import torch

    torch.set_num_threads(1)  # see the module docstring
    dataset, _ = torch_dataset(root)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )

    def run():
        for _ in range(epochs):
            yield from loader

    return run(), len(loader), lambda batch: batch[0]


LOADERS = {"ddjax": ddjax_epochs, "torch": torch_epochs}


def throughput(loader: str, root: Path, batch_size: int, workers: int) -> tuple[float, float]:
    """Images per second of the second epoch of a fresh loader, and the first epoch's seconds."""
    times, images = epoch_seconds(loader, root, batch_size, workers, 2)
    return images / times[1], times[0]


def epoch_seconds(loader: str, root: Path, batch_size: int, workers: int, epochs: int):
    """Seconds of each epoch (the first includes start-up) and images per epoch."""
    iterator, batches, ready = LOADERS[loader](root, batch_size, workers, epochs)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in range(batches):
            ready(next(iterator))
        times.append(time.perf_counter() - start)
    if hasattr(iterator, "close"):
        iterator.close()
    return times, batches * batch_size


# --------------------------------------------------------------------------------------------
# Peak memory of one pass, in a fresh process
# --------------------------------------------------------------------------------------------


def _high_water_mib(pid: int) -> float | None:
    """The kernel's peak RSS of process ``pid`` (``VmHWM`` in /proc/PID/status), in MiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return None if line is None else int(line.split()[1]) / 1024


def memory_child(loader: str, root: Path, batch_size: int, workers: int) -> None:
    """One pass over ``root``; prints its peak memory as JSON (run in a fresh process).

    A thread samples every 20 ms the RSS of this process and its descendants (summed: the
    peak of the whole tree at one moment) and each process's ``VmHWM`` (the kernel's exact
    per-process peak, kept here per pid). ``getrusage``'s ``ru_maxrss`` is not used: Linux
    carries it across ``exec``, so a process started by a large parent reports the parent's
    size.
    """
    import psutil

    me = psutil.Process()
    peak, high_water, stop = [0], {}, threading.Event()

    def sample():
        while not stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
                mib = _high_water_mib(process.pid)
                if mib is not None:
                    high_water[process.pid] = max(high_water.get(process.pid, 0.0), mib)
            peak[0] = max(peak[0], total)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times, images = epoch_seconds(loader, root, batch_size, workers, 1)
    stop.set()
    sampler.join()
    main = _high_water_mib(me.pid)
    others = [mib for pid, mib in high_water.items() if pid != me.pid]
    report = {
        "peak_tree_rss_mib": peak[0] / 2**20,
        "main_hwm_mib": main,
        "children_hwm_mib": sorted(others, reverse=True),
        "images": images,
        "seconds": times[0],
    }
    print(json.dumps(report))


def peak_memory(loader: str, root: Path, batch_size: int, workers: int) -> dict:
    command = [
        sys.executable, __file__, "--memory-child", loader, "--dir", str(root),
        "--batch-size", str(batch_size), "--workers", str(workers),
    ]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------


def environment_with_loaders() -> dict:
    import grain
    import PIL
    import torch
    from _common import environment

    env = environment()
    env.update(grain=grain.__version__, torch=torch.__version__, pillow=PIL.__version__)
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/ddjax-input-bench", help="image cache folder")
    parser.add_argument("--n", type=int, default=512, help="N: memory is measured at N and 4N")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--memory-batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "input_pipeline_cpu"))
    parser.add_argument("--memory-child", choices=sorted(LOADERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, Path(args.dir), args.batch_size, args.workers[0])
        return

    directory = Path(args.dir)
    started = time.perf_counter()
    small = make_folder(directory, args.n, args.classes)
    large = make_folder(directory, 4 * args.n, args.classes)
    print(f"folders ready in {time.perf_counter() - started:.0f} s: {small}, {large}", flush=True)
    _, torch_kind = torch_dataset(small)

    load = [os.getloadavg()[0]]
    rows = []
    for workers in args.workers:
        runs = {loader: [] for loader in LOADERS}
        for repeat in range(args.repeats):
            for loader in list(LOADERS)[:: 1 if repeat % 2 == 0 else -1]:
                runs[loader].append(throughput(loader, large, args.batch_size, workers))
        row = {"workers": workers}
        for loader, measured in runs.items():
            rates, warm_ups = zip(*measured, strict=True)
            row[loader] = {
                "images_per_s": statistics.median(rates),
                "runs_images_per_s": list(rates),
                "warm_up_epoch_s": statistics.median(warm_ups),
            }
        row["ratio"] = row["ddjax"]["images_per_s"] / row["torch"]["images_per_s"]
        rows.append(row)
        print(
            f"workers {workers}: ddjax {row['ddjax']['images_per_s']:.0f} img/s, torch "
            f"{row['torch']['images_per_s']:.0f} img/s, ratio {row['ratio']:.2f}",
            flush=True,
        )

    load.append(os.getloadavg()[0])
    memory_workers = max(args.workers)
    memory = []
    for loader in LOADERS:
        for root, count in ((small, args.n), (large, 4 * args.n)):
            measured = peak_memory(loader, root, args.memory_batch_size, memory_workers)
            memory.append({"loader": loader, "images": count, **measured})
            print(
                f"{loader} one pass over {count} images, {memory_workers} workers: peak RSS "
                f"(all processes) {measured['peak_tree_rss_mib']:.0f} MiB",
                flush=True,
            )

    report = {
        "benchmark": "input_pipeline",
        "settings": {
            "images": {"N": args.n, "4N": 4 * args.n, "classes": args.classes},
            "image_sizes": [list(s) for s in IMAGE_SIZES],
            "jpeg_quality": 90,
            "transform": "decode (PIL) + RandomResizedCrop(224, (0.08, 1), (3/4, 4/3), "
            "bilinear) + horizontal flip + float32 ImageNet normalisation",
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "throughput": "images of the timed epoch over 4N images / its seconds; a fresh "
            "loader a run (a warm-up epoch, then the timed one), the loaders taking turns; "
            "ddjax read_threads=0, torch.set_num_threads(1)",
            "torch_dataset": torch_kind,
            "memory": "one pass in a fresh process; psutil RSS of the process and its "
            "descendants, summed, sampled every 20 ms; and each process's VmHWM (kernel peak "
            f"RSS, /proc/PID/status); {memory_workers} workers, batch {args.memory_batch_size}",
        },
        "environment": {**environment_with_loaders(), "load_average_1min": load},
        "throughput": rows,
        "memory": memory,
        "seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), report)
    plot(out.with_suffix(".png"), report)
    print(f"wrote {out.with_suffix('.json')}, .md, .png ({report['seconds']:.0f} s)")


def write_markdown(path: Path, report: dict) -> None:
    env, settings = report["environment"], report["settings"]
    lines = [
        "# Input pipeline: ddjax's grain stream vs torch DataLoader",
        "",
        f"Device: {env['device']} ({env['cpu_count']} cores), grain {env['grain']}, torch "
        f"{env['torch']}, Pillow {env['pillow']}, jax {env['jax']}. {settings['transform']}; "
        f"batch {settings['batch_size']}; JPEGs of about 500x375 pixels "
        f"(quality {settings['jpeg_quality']}). Torch side: {settings['torch_dataset']}.",
        "",
        f"Throughput: {settings['throughput']}; median of {settings['repeats']} runs. "
        f"1-minute load average before and after: {env['load_average_1min'][0]:.1f}, "
        f"{env['load_average_1min'][1]:.1f} (a shared machine: other jobs ran beside it).",
        "",
        "| workers | ddjax img/s | torch img/s | ddjax / torch | ddjax warm-up epoch s | "
        "torch warm-up epoch s |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["throughput"]:
        lines.append(
            f"| {row['workers']} | {row['ddjax']['images_per_s']:.0f} | "
            f"{row['torch']['images_per_s']:.0f} | {row['ratio']:.2f} | "
            f"{row['ddjax']['warm_up_epoch_s']:.1f} | {row['torch']['warm_up_epoch_s']:.1f} |"
        )
    lines += [
        "",
        f"Peak memory of one pass ({settings['memory']}):",
        "",
        "| loader | images | peak RSS, all processes (MiB) | main VmHWM (MiB) | "
        "child processes' VmHWM (MiB) |",
        "|---|---|---|---|---|",
    ]
    for row in report["memory"]:
        children = ", ".join(f"{mib:.0f}" for mib in row["children_hwm_mib"]) or "-"
        lines.append(
            f"| {row['loader']} | {row['images']} | {row['peak_tree_rss_mib']:.0f} | "
            f"{row['main_hwm_mib']:.0f} | {children} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    workers = [row["workers"] for row in report["throughput"]]
    x = np.arange(len(workers))
    for offset, loader in ((-0.2, "ddjax"), (0.2, "torch")):
        rates = [row[loader]["images_per_s"] for row in report["throughput"]]
        left.bar(x + offset, rates, 0.4, label=loader)
    left.set_xticks(x, [str(w) for w in workers])
    left.set_xlabel("worker processes")
    left.set_ylabel("images / s")
    left.set_title("decode + RandomResizedCrop(224) + flip")
    left.legend(fontsize=8)
    for loader in LOADERS:
        rows = [row for row in report["memory"] if row["loader"] == loader]
        right.plot(
            [r["images"] for r in rows], [r["peak_tree_rss_mib"] for r in rows], "o-", label=loader
        )
    right.set_xlabel("images in the pass")
    right.set_ylabel("peak RSS, all processes (MiB)")
    right.set_ylim(bottom=0)
    right.set_title("memory of one pass")
    right.legend(fontsize=8)
    fig.suptitle(f"Input pipeline ({report['environment']['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
    main()
