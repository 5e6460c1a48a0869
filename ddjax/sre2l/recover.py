r"""``ddjax recover``: SRe2L's recover stage in a work directory, resumable batch by batch.

Yin, Xing & Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale From A
New Perspective" (NeurIPS 2023), recover stage. The objective, the step and the optimisation of
one batch are in :mod:`ddjax.sre2l.recover_step` (its docstring states the maths and where
ddjax differs from the official code); this module is the stage around them: the config checks
(the fields are ``configs/recover/sre2l.py``'s), the teacher and data checks, and the driver
(:func:`run_recover`).

The work directory of :func:`run_recover`::

    WORKDIR/config.json              the resolved config (resume refuses a different one)
    WORKDIR/metrics.jsonl            loss parts every log_every iterations and per batch
    WORKDIR/batches/batch_NNNNN.npz  each finished batch (written atomically)
    WORKDIR/synset.npz, synset.png   the recovered set (after the optional JPEG round trip)
    WORKDIR/results.json             per-batch final losses and the run's summary

Re-running the same command skips the finished batches; since every batch draws its noise and
augmentation from ``fold_in(key(seed), batch_index)``, a killed and resumed run gives the same
set as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from ddjax import data as data_lib
from ddjax import loop
from ddjax.errors import DDJaxError, check
from ddjax.sre2l import teacher as teacher_lib
from ddjax.sre2l.contract import DataContract
from ddjax.sre2l.recover_step import (
    BATCHINGS,
    RecoverBatch,
    RecoverSettings,
    _is_int,
    batch_sharding_for,
    bn_layer_names,
    jpeg_round_trip,
    make_recover_step,
    plan_batches,
    recover_batch,
)
from ddjax.synset import SyntheticSet, save_grid
from ddjax.workdir import Workdir

__all__ = ["run_recover", "settings_from_config"]


def settings_from_config(
    config: ml_collections.ConfigDict, dataset: data_lib.Dataset | DataContract
) -> RecoverSettings:
    """The :class:`RecoverSettings` of a ``configs/recover/sre2l.py`` config, checked for data."""
    settings = RecoverSettings(
        iterations=config.iterations,
        lr=config.lr,
        r_bn=config.r_bn,
        first_bn_multiplier=config.first_bn_multiplier,
        crop=config.crop,
        crop_scale=tuple(config.crop_scale),
        flip=config.flip,
        jitter=tuple(config.jitter),
        mean=tuple(float(m) for m in dataset.mean),
        std=tuple(float(s) for s in dataset.std),
    )
    settings.validate(dataset.image_shape)
    return settings


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Field checks that need no data (run before anything is loaded or written)."""
    check(bool(config.teacher), "config.teacher is empty; pass --config.teacher=TEACHER_DIR")
    check(
        not config.dataset.zca,
        "config.dataset.zca=True: SRe2L recovers in mean/std-normalised space (clipping and the "
        "JPEG round trip need it); use a teacher trained without ZCA",
    )
    check(
        config.batching in BATCHINGS,
        f"config.batching={config.batching!r} is not one of {list(BATCHINGS)}",
    )
    check(_is_int(config.ipc) and config.ipc >= 1, f"config.ipc={config.ipc!r} must be >= 1")
    check(
        _is_int(config.batch_size) and config.batch_size >= 1,
        f"config.batch_size={config.batch_size!r} must be >= 1",
    )
    quality = config.jpeg_quality
    check(
        _is_int(quality) and (quality == 0 or 1 <= quality <= 95),
        f"config.jpeg_quality={quality!r} must be 0 (off) or 1..95 (SRe2L: 75)",
    )
    check(
        _is_int(config.log_every) and config.log_every >= 1,
        f"config.log_every={config.log_every!r} must be >= 1",
    )


def _batch_file(work: Workdir, index: int) -> Path:
    return work.file("batches") / f"batch_{index:05d}.npz"


def _save_batch(path: Path, batch: RecoverBatch, images: np.ndarray, metrics: dict) -> None:
    """Writes a finished batch atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    loop.atomic_savez(
        path,
        images=images.astype(np.float32),
        classes=batch.classes,
        ipc_ids=batch.ipc_ids,
        **{f"metric_{name}": np.asarray(value) for name, value in metrics.items()},
    )


def _load_batch(
    path: Path, batch: RecoverBatch, *, images: bool = True
) -> tuple[np.ndarray | None, dict] | None:
    """A finished batch ``(images, metrics)``, or None when its file is missing.

    With ``images=False`` only the small members are read (an ``.npz`` is a zip of arrays):
    resuming an ImageNet-scale run does not read every finished batch's images.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            same = np.array_equal(f["classes"], batch.classes) and np.array_equal(
                f["ipc_ids"], batch.ipc_ids
            )
            if not same:
                raise DDJaxError(
                    f"{path} holds another batch than this config plans; use a new --workdir"
                )
            metrics = {k[len("metric_") :]: f[k] for k in f.files if k.startswith("metric_")}
            return (f["images"].astype(np.float32) if images else None), metrics
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, DDJaxError):
            raise
        raise DDJaxError(f"{path}: cannot read finished batch ({e}); delete it to redo") from None


def run_recover(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    progress: bool = True,
    compiler_options: dict | None = None,
    _stop_after: int | None = None,
) -> SyntheticSet | None:
    """``ddjax recover``: SRe2L's recover stage in a work directory, resumable by batch.

    Loads the teacher (:func:`ddjax.sre2l.teacher.load_teacher`), checks it against the
    dataset (name, shape, classes, normalisation; with ``config.dataset.name`` empty no images
    are loaded and the teacher's recorded data contract is used instead), plans the batches
    (:func:`plan_batches`), recovers each unfinished one (:func:`recover_batch`, batch ``b``
    keyed by ``fold_in(key(seed), b)``) and saves it atomically; then assembles the set in
    class order, applies the optional JPEG round trip and writes ``synset.npz`` +
    ``synset.png``.

    Args:
        config: a ``configs/recover/sre2l.py`` config.
        workdir: the run directory.
        progress: show a progress bar over all iterations (silent when not a terminal).
        compiler_options: XLA compiler options for the step (tests compile fast).
        _stop_after: for tests: return after recovering this many batches in this call, as if
            the process had been killed there (no synthetic set is written).

    Returns:
        The :class:`~ddjax.synset.SyntheticSet` (hard labels; meta ``method='sre2l'``,
        ``teacher``, …); ``None`` only when stopped early by ``_stop_after``.

    Raises:
        DDJaxError: bad config, a teacher that does not fit the data or has no BatchNorm, or a
            work directory holding another run; all before anything is written.
    """
    _check_config(config)
    teacher = teacher_lib.load_teacher(config.teacher)
    if config.dataset.name:
        loaded = data_lib.open_from_config(config.dataset, stage="recover")
        teacher_lib.check_teacher(teacher, loaded)
        dataset = DataContract.of_dataset(loaded)
    else:  # ImageNet-scale data: the teacher's recorded contract, no images read
        dataset = DataContract.of_teacher(teacher.meta)
    check(
        teacher_lib.has_batchnorm(teacher.variables),
        f"teacher {config.teacher} ({teacher.meta['model']}) has no BatchNorm layers; SRe2L's "
        "recover matches BatchNorm statistics",
    )
    settings = settings_from_config(config, dataset)
    batches = plan_batches(dataset.num_classes, config.ipc, config.batch_size, config.batching)
    layer_names = bn_layer_names(teacher.model, teacher.variables, dataset.image_shape)

    work = Workdir(workdir, config, "recover")
    results = work.results()
    finished = results.setdefault("batches", {})
    steps: dict[int, tuple[Callable, Any]] = {}  # batch size -> (step, sharding)
    key = jax.random.key(config.seed)
    saved = [_load_batch(_batch_file(work, i), b, images=False) for i, b in enumerate(batches)]
    done = [entry is not None for entry in saved]
    for index, entry in enumerate(saved):
        # A kill between a batch's file and results.json: its numbers are in the file.
        if entry is not None and str(index) not in finished:
            finished[str(index)] = _batch_record(entry[1], layer_names)
    bar = loop.progress_bar(
        progress=progress,
        desc="recover",
        total=len(batches) * settings.iterations,
        initial=sum(done) * settings.iterations,
    )
    kill = loop.KillSwitch(_stop_after)  # counts the batches recovered in this call
    for index, batch in enumerate(batches):
        if done[index]:
            continue
        if kill.fired:
            bar.close()
            return None
        size = len(batch.classes)
        if size not in steps:
            batch_sharding = batch_sharding_for(size) if config.shard_batch else None
            step = make_recover_step(
                teacher.model,
                settings,
                batch_sharding=batch_sharding,
                compiler_options=compiler_options,
            )
            steps[size] = (step, batch_sharding)
        step, batch_sharding = steps[size]

        def log(iteration: int, metrics: dict, index: int = index) -> None:
            work.log(event="step", batch=index, iteration=iteration, **_scalars(metrics))
            bar.set_postfix(batch=index, loss=f"{float(metrics['loss']):.4f}")

        start = time.time()
        images, metrics = recover_batch(
            step,
            teacher.variables,
            batch.classes,
            jax.random.fold_in(key, index),
            settings,
            dataset.image_shape,
            batch_sharding=batch_sharding,
            log_every=config.log_every,
            on_log=log,
            on_step=lambda: bar.update(1),
        )
        _save_batch(_batch_file(work, index), batch, images, metrics)
        seconds = round(time.time() - start, 2)
        record = {**_batch_record(metrics, layer_names), "seconds": seconds}
        finished[str(index)] = record
        work.save_results(results)
        work.log(event="batch", batch=index, **record)
        kill.tick()
    bar.close()

    synset = _assemble(config, dataset, teacher, batches, work)
    synset.save(work.file("synset.npz"))
    save_grid(work.file("synset.png"), synset, dataset.to_pixels)
    losses = [finished[str(i)]["loss"] for i in range(len(batches)) if str(i) in finished]
    results["summary"] = {
        "num_images": int(len(synset.labels)),
        "num_batches": len(batches),
        "final_loss_mean": float(np.mean(losses)) if losses else None,
        "jpeg_quality": config.jpeg_quality,
    }
    work.save_results(results)
    print(f"recover: {len(synset.labels)} images in {work.path / 'synset.npz'}")
    return synset


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def _batch_record(metrics: Mapping[str, Any], layer_names: Sequence[str]) -> dict:
    """A finished batch's entry of ``results.json``: its last loss parts, per BN layer too."""
    per_layer = map(float, np.asarray(metrics["bn_layers"]))
    return {**_scalars(metrics), "bn_layers": dict(zip(layer_names, per_layer, strict=True))}


def _assemble(config, dataset, teacher, batches, work) -> SyntheticSet:
    """The set in class order (class 0's ipc images first), from the saved batches."""
    images = np.empty((dataset.num_classes, config.ipc, *dataset.image_shape), np.float32)
    for index, batch in enumerate(batches):
        loaded = _load_batch(_batch_file(work, index), batch)
        check(loaded is not None, f"batch {index} is missing from {work.path / 'batches'}")
        images[batch.classes, batch.ipc_ids] = loaded[0]
    images = images.reshape(-1, *dataset.image_shape)
    if config.jpeg_quality:
        images = jpeg_round_trip(images, dataset.mean, dataset.std, config.jpeg_quality)
    labels = np.repeat(np.arange(dataset.num_classes, dtype=np.int32), config.ipc)
    return SyntheticSet(
        images=images,
        labels=labels,
        num_classes=dataset.num_classes,
        meta={
            "method": "sre2l",
            "teacher": str(teacher.meta.get("path", config.teacher)),
            "teacher_model": teacher.meta["model"],
            "dataset": dataset.name,
            "ipc": config.ipc,
            "batching": config.batching,
            "batch_size": config.batch_size,
            "iterations": config.iterations,
            "lr": config.lr,
            "r_bn": config.r_bn,
            "jpeg_quality": config.jpeg_quality,
            "seed": config.seed,
        },
    )
