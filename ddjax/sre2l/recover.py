r"""``ddjax recover``: SRe2L's recover stage in a work directory, resumable batch by batch.

Yin, Xing & Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale From A
New Perspective" (NeurIPS 2023), recover stage. The objective, the step and the optimisation of
one batch are in :mod:`ddjax.sre2l.recover_step` (its docstring states the maths and where
ddjax differs from the official code); this module is the stage around them: the config checks
(the fields are ``configs/recover/sre2l.py``'s), the teacher and data checks, and the driver
(:func:`run_recover`).

The work directory of :func:`run_recover`::

    WORKDIR/config.json              the resolved config (resume refuses a different one)
    WORKDIR/metrics.jsonl            loss parts every log_every iterations, checkpoints, batches
    WORKDIR/inflight.npz             the batch in progress every checkpoint_every iterations:
                                     its RecoverState (images, Adam moments, step, key)
    WORKDIR/results.json             per-batch final losses and the run's summary
    WORKDIR/synset.png               a picture of the set (folder: of a bounded sample)

    output='npz' (small sets):
    WORKDIR/batches/batch_NNNNN.npz  each finished batch, float32 (written atomically)
    WORKDIR/synset.npz               the recovered set (after the optional JPEG round trip)

    output='folder' (ImageNet scale; SRe2L's published format):
    WORKDIR/synset/CCC/III.jpg       class CCC's image III, JPEG at jpeg_quality (75 as
                                     published); .png, lossless, when jpeg_quality=0
    WORKDIR/synset/.done/            one record per finished batch (files, SHA-256s, losses)
    WORKDIR/synset/synset.json       what the folder holds (:mod:`ddjax.synfolder`)

Re-running the same command skips the finished batches and continues the batch in progress
from ``inflight.npz``; since every batch draws its noise and augmentation from
``fold_in(key(seed), batch_index)`` and the checkpoint holds the state's key, a killed and
resumed run gives the same set as an uninterrupted one. In folder mode each finished batch is
encoded and written at once and the set is never held in memory, so memory does not grow
with the number of batches; the folder is an ImageNet-layout dataset that the next stages
read lazily (:func:`ddjax.synfolder.open_synfolder`).
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from ddjax import data as data_lib
from ddjax import distributed, guard, loop, validate
from ddjax.errors import DDJaxError, check
from ddjax.sre2l import label_store
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
from ddjax.synfolder import SynFolder, SynFolderWriter, open_synfolder
from ddjax.synset import SyntheticSet, save_grid
from ddjax.workdir import Workdir

__all__ = ["OUTPUTS", "run_recover", "settings_from_config"]

#: ``npz``: float batch files, then ``synset.npz`` (small sets); ``folder``: every finished
#: batch written at once as image files, SRe2L's published format (ImageNet scale).
OUTPUTS = ("npz", "folder")


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
        f"config.jpeg_quality={quality!r} must be 0 (off; PNG files with output='folder') or "
        "1..95 (SRe2L: 75)",
    )
    check(
        _is_int(config.log_every) and config.log_every >= 1,
        f"config.log_every={config.log_every!r} must be >= 1",
    )
    check(
        config.output in OUTPUTS,
        f"config.output={config.output!r} is not one of {list(OUTPUTS)}",
    )
    check(
        _is_int(config.checkpoint_every) and config.checkpoint_every >= 0,
        f"config.checkpoint_every={config.checkpoint_every!r} must be an integer >= 0 "
        "(iterations between in-batch checkpoints; 0: none)",
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
            _check_same_batch(path, f, batch)
            metrics = {k[len("metric_") :]: f[k] for k in f.files if k.startswith("metric_")}
            return (f["images"].astype(np.float32) if images else None), metrics
    except DDJaxError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise DDJaxError(f"{path}: cannot read finished batch ({e}); delete it to redo") from None


def _check_same_batch(path: Path, saved: Mapping[str, np.ndarray], batch: RecoverBatch) -> None:
    same = np.array_equal(saved["classes"], batch.classes) and np.array_equal(
        saved["ipc_ids"], batch.ipc_ids
    )
    check(same, f"{path} holds another batch than this config plans; use a new --workdir")


class _NpzOutput:
    """``config.output='npz'``: ``batches/batch_NNNNN.npz`` (float32), then ``synset.npz``.

    The set is assembled in memory at the end (small datasets).
    """

    def __init__(self, work: Workdir, batches: Sequence[RecoverBatch], layer_names: list[str]):
        self.work, self.batches, self.layer_names = work, batches, layer_names

    def done(self, index: int) -> dict | None:
        """The ``results.json`` entry of a finished batch (from its file), or None."""
        entry = _load_batch(_batch_file(self.work, index), self.batches[index], images=False)
        return None if entry is None else _batch_record(entry[1], self.layer_names)

    def save(self, index: int, images: np.ndarray, metrics: dict, record: dict) -> None:
        del record  # the file holds the metrics themselves
        _save_batch(_batch_file(self.work, index), self.batches[index], images, metrics)

    def finish(
        self, config: ml_collections.ConfigDict, dataset: DataContract, meta: dict
    ) -> tuple[SyntheticSet, dict]:
        """Writes ``synset.npz`` and ``synset.png``; returns the set and its summary."""
        synset = _assemble(config, dataset, self.batches, self.work, meta)
        path = synset.save(self.work.file("synset.npz"))
        save_grid(self.work.file("synset.png"), synset, dataset.to_pixels)
        return synset, {"synset": str(path), "num_images": int(len(synset.labels))}


class _FolderOutput:
    """``config.output='folder'``: each finished batch written at once as image files.

    ``WORKDIR/synset`` is a :mod:`ddjax.synfolder` folder (``CCC/III.jpg``, or ``.png`` when
    ``jpeg_quality=0``; one record per finished batch in ``synset/.done``, holding the
    batch's ``results.json`` entry). No float copy of the set is kept, on disk or in memory.
    """

    def __init__(
        self,
        work: Workdir,
        batches: Sequence[RecoverBatch],
        config: ml_collections.ConfigDict,
        dataset: DataContract,
        meta: dict,
    ):
        quality = config.jpeg_quality
        self.work, self.batches = work, batches
        self.writer = SynFolderWriter(
            work.file("synset"),
            num_classes=dataset.num_classes,
            ipc=config.ipc,
            image_shape=dataset.image_shape,
            mean=dataset.mean,
            std=dataset.std,
            image_format="jpeg" if quality else "png",
            jpeg_quality=quality or 75,  # not used for PNG
            meta=meta,
        )

    def done(self, index: int) -> dict | None:
        """The ``results.json`` entry of a finished batch (from its record), or None."""
        record = self.writer.done(index)
        return None if record is None else dict(record.get("recover", {}))

    def save(self, index: int, images: np.ndarray, metrics: dict, record: dict) -> None:
        del metrics  # the record holds their scalars
        batch = self.batches[index]
        self.writer.write_batch(index, batch.classes, batch.ipc_ids, images, {"recover": record})

    def finish(
        self, config: ml_collections.ConfigDict, dataset: DataContract, meta: dict
    ) -> tuple[SynFolder, dict]:
        """Checks that the folder is whole and draws a bounded sample into ``synset.png``."""
        del meta  # in synset/synset.json
        folder = open_synfolder(self.writer.root)
        # At most GRID_CLASSES classes spread over the range, GRID_PER_CLASS images each: the
        # picture (and what is decoded for it) stays small at 1,000 classes.
        classes = np.unique(np.linspace(0, folder.num_classes - 1, GRID_CLASSES).astype(int))
        per_class = min(GRID_PER_CLASS, folder.ipc)
        indices = [np.flatnonzero(folder.labels == c)[:per_class] for c in classes]
        sample = SyntheticSet(
            images=folder.take(np.concatenate(indices)),
            labels=np.repeat(np.arange(len(classes), dtype=np.int32), per_class),
            num_classes=len(classes),
        )
        save_grid(self.work.file("synset.png"), sample, dataset.to_pixels)
        summary = {
            "synset": str(folder.root),
            "num_images": folder.num_images,
            "bytes": folder.bytes,
            "image_format": folder.image_format,
            "fingerprint": folder.fingerprint,
        }
        return folder, summary


#: ``synset.png`` of a folder output: at most this many classes, and images per class.
GRID_CLASSES, GRID_PER_CLASS = 10, 10


class _InflightBatch:
    """``WORKDIR/inflight.npz``: the state of the batch being recovered, every K iterations.

    Written atomically by :func:`ddjax.loop.atomic_savez` (all processes call it; process 0
    writes), removed once the batch is saved. It names its batch, so a resumed run uses it
    only for that batch.
    """

    def __init__(self, work: Workdir):
        self.path = work.file("inflight.npz")

    def load(self, batches: Sequence[RecoverBatch]) -> tuple[int, dict[str, np.ndarray]] | None:
        """``(batch index, state arrays)`` of the checkpoint on disk, or None."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as f:
                index = int(f["batch"])
                check(
                    0 <= index < len(batches),
                    f"{self.path} is a checkpoint of batch {index}, this config plans "
                    f"{len(batches)}; use a new --workdir",
                )
                _check_same_batch(self.path, f, batches[index])
                prefix = "state/"
                state = {k[len(prefix) :]: f[k] for k in f.files if k.startswith(prefix)}
        except DDJaxError:
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            # A bit flip fails the zip member's CRC-32 check (BadZipFile).
            raise DDJaxError(
                f"{self.path}: cannot read the in-batch checkpoint ({e}); delete it to restart "
                "that batch"
            ) from None
        return index, state

    def save(self, index: int, batch: RecoverBatch, state: Mapping[str, np.ndarray]) -> None:
        loop.atomic_savez(
            self.path,
            batch=np.int64(index),
            classes=batch.classes,
            ipc_ids=batch.ipc_ids,
            **{f"state/{name}": array for name, array in state.items()},
        )

    def remove(self) -> None:
        """Removes the checkpoint (every process calls this; process 0 removes)."""
        distributed.on_primary(f"remove {self.path}", lambda: self.path.unlink(missing_ok=True))


class _Stopped(Exception):
    """Raised by the ``_stop_after_iterations`` test hook: the run returns as if killed."""


def run_recover(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    progress: bool = True,
    compiler_options: dict | None = None,
    _stop_after: int | None = None,
    _stop_after_iterations: int | None = None,
) -> SyntheticSet | SynFolder | None:
    """``ddjax recover``: SRe2L's recover stage in a work directory, resumable.

    Loads the teacher (:func:`ddjax.sre2l.teacher.load_teacher`), checks it against the
    dataset (name, shape, classes, normalisation; with ``config.dataset.name`` empty no images
    are loaded and the teacher's recorded data contract is used instead), plans the batches
    (:func:`plan_batches`), recovers each unfinished one (:func:`recover_batch`, batch ``b``
    keyed by ``fold_in(key(seed), b)``) and saves it at once: with ``config.output='npz'``
    as a float batch file, the set assembled at the end in class order, JPEG round trip applied,
    into ``synset.npz`` + ``synset.png``; with ``'folder'`` as image files in ``WORKDIR/synset``
    (:class:`ddjax.synfolder.SynFolderWriter`; JPEG at ``jpeg_quality``, PNG when it is 0).
    With ``config.checkpoint_every = K`` the batch in progress is checkpointed every K
    iterations (``inflight.npz``), so a kill loses at most K iterations.

    Args:
        config: a ``configs/recover/sre2l.py`` config.
        workdir: the run directory.
        progress: show a progress bar over all iterations (silent when not a terminal).
        compiler_options: XLA compiler options for the step (tests compile fast).
        _stop_after: for tests: return after recovering this many batches in this call, as if
            the process had been killed there (no synthetic set is written).
        _stop_after_iterations: for tests: return after this many iterations in this call,
            inside a batch, as if killed there.

    Returns:
        ``'npz'``: the :class:`~ddjax.synset.SyntheticSet` (hard labels; meta
        ``method='sre2l'``, ``teacher``, …); ``'folder'``: the
        :class:`~ddjax.synfolder.SynFolder`; ``None`` when stopped early by a test hook.

    Raises:
        DDJaxError: bad config, a teacher that does not fit the data or has no BatchNorm, or a
            work directory holding another run; all before anything is written.
    """
    validate.check_config(config)
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
    check(
        config.output == "npz" or dataset.image_shape[-1] in (1, 3),
        f"config.output='folder' writes image files, which need 1 or 3 channels; the data has "
        f"{dataset.image_shape[-1]}; use config.output='npz'",
    )
    settings = settings_from_config(config, dataset)
    batches = plan_batches(dataset.num_classes, config.ipc, config.batch_size, config.batching)
    layer_names = bn_layer_names(teacher.model, teacher.variables, dataset.image_shape)
    # The teacher's fingerprint, recorded with the results: a re-run with a teacher that changed
    # since (e.g. squeezed again into the same directory) is refused, not resumed with images of
    # two teachers.
    inputs = {"teacher": label_store.teacher_fingerprint(teacher.model, teacher.variables)}
    validate.check_workdir_inputs(workdir, inputs, {"teacher": f"config.teacher {config.teacher}"})

    work = Workdir(workdir, config, "recover")
    meta = _meta(config, dataset, teacher)
    if config.output == "folder":
        output = _FolderOutput(work, batches, config, dataset, meta)
    else:
        output = _NpzOutput(work, batches, layer_names)
    # Read first, so that a damaged in-batch checkpoint is refused with nothing written.
    inflight = _InflightBatch(work)
    checkpoint = inflight.load(batches)
    results = work.results()
    if results.get("inputs") != inputs:
        results["inputs"] = inputs
        work.save_results(results)
    finished = results.setdefault("batches", {})
    done = []
    for index in range(len(batches)):
        record = output.done(index)
        done.append(record is not None)
        # A kill between a batch's output and results.json: its numbers are in the output.
        if record is not None and str(index) not in finished:
            finished[str(index)] = record
    if checkpoint is not None and done[checkpoint[0]]:  # killed before its removal
        inflight.remove()
        checkpoint = None
    # The restored position: the first unfinished batch (batches finish in order) at the
    # in-batch checkpoint's iteration. Events after it are redone, so dropped from the log.
    resume_batch = done.index(False) if False in done else len(batches)
    resume_iteration = (
        int(checkpoint[1].get("step", 0)) if checkpoint and checkpoint[0] == resume_batch else 0
    )
    work.rewind((resume_batch, resume_iteration), key=("batch", "iteration"))
    bar = loop.progress_bar(
        progress=progress,
        desc="recover",
        total=len(batches) * settings.iterations,
        initial=sum(done) * settings.iterations
        + (int(checkpoint[1].get("step", 0)) if checkpoint else 0),
    )
    steps: dict[int, tuple[Callable, Any]] = {}  # batch size -> (step, sharding)
    key = jax.random.key(config.seed)
    kill = loop.KillSwitch(_stop_after)  # counts the batches recovered in this call
    kill_inside = loop.KillSwitch(_stop_after_iterations)  # counts iterations
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
        start_state = checkpoint[1] if checkpoint and checkpoint[0] == index else None

        def log(iteration: int, metrics: dict, index: int = index) -> None:
            work.log(event="step", batch=index, iteration=iteration, **_scalars(metrics))
            bar.set_postfix(batch=index, loss=f"{float(metrics['loss']):.4f}")

        def save_state(iteration: int, state: dict, index: int = index, batch=batch) -> None:
            inflight.save(index, batch, state)
            work.log(event="checkpoint", batch=index, iteration=iteration)

        def skipped(iteration: int, count: int, index: int = index) -> None:
            work.log(
                event="skipped", batch=index, iteration=iteration, count=count, reason=guard.REASON
            )
            bar.write(f"recover batch {index}: {count} updates skipped up to iteration {iteration}")

        def tick() -> None:
            bar.update(1)
            kill_inside.tick()
            if kill_inside.fired:
                raise _Stopped

        start = time.time()
        try:
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
                on_step=tick,
                start_state=start_state,
                checkpoint_every=config.checkpoint_every,
                on_checkpoint=save_state,
                on_skip=skipped,
            )
        except _Stopped:
            bar.close()
            return None
        except DDJaxError as e:
            if start_state is None:
                raise
            raise DDJaxError(f"{inflight.path}: {e}") from None
        # seconds: this call's part of the batch (a resumed batch's earlier part is not counted)
        record = {**_batch_record(metrics, layer_names), "seconds": round(time.time() - start, 2)}
        output.save(index, images, metrics, record)
        finished[str(index)] = record
        work.save_results(results)
        # Positioned at the batch's last iteration, so that a redone batch drops it (rewind).
        work.log(event="batch", batch=index, iteration=settings.iterations, **record)
        if config.checkpoint_every or start_state is not None:
            inflight.remove()
        kill.tick()
    bar.close()

    synset, summary = output.finish(config, dataset, meta)
    losses = [finished[str(i)]["loss"] for i in range(len(batches)) if str(i) in finished]
    losses = [loss for loss in losses if loss is not None]
    results["summary"] = {
        **summary,
        "num_batches": len(batches),
        "final_loss_mean": float(np.mean(losses)) if losses else None,
        "jpeg_quality": config.jpeg_quality,
    }
    work.save_results(results)
    print(f"recover: {summary['num_images']} images in {summary['synset']}")
    return synset


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The scalar metrics for JSON (``None`` for a non-finite loss of a skipped update)."""
    return {k: guard.finite_or_none(v) for k, v in metrics.items() if np.ndim(v) == 0}


def _batch_record(metrics: Mapping[str, Any], layer_names: Sequence[str]) -> dict:
    """A finished batch's entry of ``results.json``: its last loss parts, per BN layer too."""
    per_layer = map(guard.finite_or_none, np.asarray(metrics["bn_layers"]))
    return {**_scalars(metrics), "bn_layers": dict(zip(layer_names, per_layer, strict=True))}


def _meta(config, dataset, teacher) -> dict:
    """The recovered set's provenance (``SyntheticSet.meta``, or the folder's ``synset.json``)."""
    return {
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
    }


def _assemble(config, dataset, batches, work, meta) -> SyntheticSet:
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
    return SyntheticSet(images=images, labels=labels, num_classes=dataset.num_classes, meta=meta)
