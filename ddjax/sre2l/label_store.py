"""The relabel store: FKD-style soft labels of every epoch, written once and replayed exactly.

On ImageNet-1K SRe2L (Yin, Xing & Shen, NeurIPS 2023) makes its soft labels once, offline, for
300 epochs (``SRe2L/relabel/generate_soft_label.py`` with FKD's ``utils_fkd.py``): the views of
:mod:`ddjax.sre2l.views`, labelled by the teacher in eval mode, raw logits kept in fp16.
Training (``train_FKD.py``) replays exactly those crops, flips and mixes, so the student sees
the very images the logits were computed on (:func:`replay`, :func:`augmented_batch`).

**Storage** (:func:`write_store`): one ``epoch_NNNN.npz`` per epoch with all its batches
stacked along the image axis, in batch order -- ``boxes`` (N, 4) float32 normalised
``(top/H, left/W, h/H, w/W)`` as FKD stores them, ``flips`` (N,) bool, ``mix_perm`` (N,) int32
(each image's partner within its batch), ``mix_lam`` and ``mix_bbox`` per batch, and
``logits`` (N, C) float16 -- plus ``relabel.json``: fingerprints of the dataset, the teacher
and the synthetic set, the batch size, seed, epochs, augmentation and teacher mode, and the
bytes of every epoch file. Files are written to a temporary name and renamed, so a killed run
loses at most the epoch in progress and resumes with it. FKD writes one ``.tar`` per batch
(14,700 files at ImageNet IPC 50); the soft labels themselves are the same size. The batch
indices are not stored: they are rebuilt from the seed (:func:`ddjax.sre2l.views.batch_map`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax import distributed, loop
from ddjax.data import Dataset
from ddjax.errors import DDJaxError, check
from ddjax.sre2l.contract import DataContract
from ddjax.sre2l.views import (
    TEACHER_MODES,
    AugmentSpec,
    BatchAugment,
    augmenter,
    batch_key,
    batch_map,
    check_positive,
    check_teacher_fits,
    gather,
    make_labeller,
)
from ddjax.synfolder import FolderImages, SynFolder
from ddjax.synset import SyntheticSet

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "STORE_DIR",
    "BatchLabels",
    "LabelStore",
    "augmented_batch",
    "check_store",
    "dataset_fingerprint",
    "open_store",
    "predict_storage",
    "replay",
    "synset_fingerprint",
    "teacher_fingerprint",
    "write_store",
]

FORMAT = 1
INDEX_FILE = "relabel.json"
STORE_DIR = "labels"

Array = jax.Array
Log = Callable[..., None]


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def dataset_fingerprint(dataset: Dataset | DataContract) -> dict:
    """What of a dataset the labels depend on: its name and the space its images live in.

    Args:
      dataset: a loaded :class:`ddjax.data.Dataset`, or the ``DataContract`` a teacher records
        (``ddjax.sre2l.recover``): both give the same fingerprint for the same data space.

    Returns:
      ``{'name', 'image_shape', 'num_classes', 'mean', 'std', 'zca_sha256', 'sha256'}``, the
      last a hash of the others.
    """
    zca = None
    if getattr(dataset, "zca", None) is not None:
        whiten = np.ascontiguousarray(np.asarray(dataset.zca.whiten, np.float32))
        zca = hashlib.sha256(whiten.tobytes()).hexdigest()[:16]
    description = {
        "name": dataset.name,
        "image_shape": list(dataset.image_shape),
        "num_classes": dataset.num_classes,
        "mean": [round(float(m), 6) for m in dataset.mean],
        "std": [round(float(s), 6) for s in dataset.std],
        "zca_sha256": zca,
    }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return {**description, "sha256": digest[:16]}


def synset_fingerprint(synset: SyntheticSet | SynFolder) -> str:
    """A hash of the synthetic images (float32) and labels: a changed pixel changes it.

    A synthetic folder's is its own (:attr:`ddjax.synfolder.SynFolder.fingerprint`, from the
    SHA-256 of every file, recorded when written): no image is read.
    """
    if isinstance(synset, SynFolder):
        return synset.fingerprint[:16]
    digest = hashlib.sha256()
    images = np.ascontiguousarray(np.asarray(synset.images, np.float32))
    labels = np.ascontiguousarray(np.asarray(synset.labels))
    digest.update(repr((images.shape, labels.shape, str(labels.dtype))).encode())
    digest.update(images.tobytes())
    digest.update(labels.tobytes())
    return digest.hexdigest()[:16]


def teacher_fingerprint(model: nn.Module, variables: Mapping[str, Any]) -> str:
    """A hash of the teacher's architecture (its module's fields) and every variable's values."""
    digest = hashlib.sha256(repr(model).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(dict(variables)):
        array = np.ascontiguousarray(np.asarray(leaf, np.float32))
        digest.update(f"{jax.tree_util.keystr(path)}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------

# Fields of relabel.json that decide the labels: a store is resumed only if all agree.
_IDENTITY_FIELDS = (
    "format",
    "dataset",
    "synset_sha256",
    "teacher_sha256",
    "num_images",
    "num_classes",
    "image_shape",
    "batch_size",
    "seed",
    "augment",
    "teacher_mode",
)


class BatchLabels(NamedTuple):
    """One replayed batch: which images, how they were augmented, what the teacher said.

    Attributes:
      indices: ``(B,)`` int32 indices into the synthetic set, in batch order.
      augment: the batch's :class:`ddjax.sre2l.views.BatchAugment` (NumPy arrays).
      logits: ``(B, num_classes)`` float16 raw teacher logits on the augmented batch.
    """

    indices: np.ndarray
    augment: BatchAugment
    logits: np.ndarray


def _index_field(name: str, convert: Callable[[Any], Any], doc: str | None = None) -> property:
    """A read-only attribute of :class:`LabelStore`: ``convert(index[name])``."""
    return property(lambda store: convert(store.index[name]), doc=doc)


@dataclasses.dataclass(frozen=True)
class LabelStore:
    """An opened relabel store (:func:`open_store`): its directory and ``relabel.json``.

    Attributes:
      path: the store directory.
      index: the parsed ``relabel.json``.
    """

    path: Path
    index: dict

    batch_size = _index_field("batch_size", int)
    seed = _index_field("seed", int)
    epochs = _index_field(
        "epochs", int, "Epochs the store was asked for (:attr:`completed_epochs`: those on disk)."
    )
    num_images = _index_field("num_images", int)
    num_classes = _index_field("num_classes", int)
    spec = _index_field("augment", AugmentSpec.from_json, "The views (an ``AugmentSpec``).")
    teacher_mode = _index_field("teacher_mode", str)
    storage_bytes = _index_field(
        "storage_bytes", int, "Bytes of the epoch files (soft labels + augmentation parameters)."
    )

    def epoch_file(self, epoch: int) -> Path:
        return self.path / f"epoch_{epoch:04d}.npz"

    @property
    def completed_epochs(self) -> list[int]:
        """The epochs whose file is on disk (complete: files appear only by atomic rename)."""
        return _epochs_on_disk(self.path)

    def describe(self) -> str:
        """``'labels/ (3/300 epochs, batch 1024, seed 42, cutmix)'`` for messages."""
        return (
            f"{self.path} ({len(self.completed_epochs)}/{self.epochs} epochs, batch "
            f"{self.batch_size}, seed {self.seed}, {self.spec.crop}+{self.spec.mix})"
        )


def _epochs_on_disk(path: Path) -> list[int]:
    epochs = []
    for file in path.glob("epoch_*.npz"):
        number = file.name[len("epoch_") : -len(".npz")]
        if number.isdigit():
            epochs.append(int(number))
    return sorted(epochs)


def open_store(path: str | os.PathLike) -> LabelStore:
    """Opens a store written by :func:`write_store`.

    Raises:
      DDJaxError: no store at ``path``, or an unreadable or foreign ``relabel.json``.
    """
    path = Path(path)
    file = path / INDEX_FILE
    check(
        file.is_file(),
        f"{path} is not a relabel store (no {INDEX_FILE}); make one with ddjax relabel "
        "(labels='stored')",
    )
    index = loop.read_json(file, what="the relabel store")
    missing = [k for k in (*_IDENTITY_FIELDS, "epochs", "storage_bytes") if k not in index]
    check(
        index.get("format") == FORMAT and not missing,
        f"{file} is not a relabel index of format {FORMAT} (missing {missing or ['format']})",
    )
    return LabelStore(path=path, index=index)


def check_store(
    store: LabelStore,
    *,
    synset: SyntheticSet | None = None,
    teacher: Any | None = None,
    dataset: Dataset | None = None,
) -> None:
    """Refuses a store made for other images, another teacher or another data space.

    Args:
      store: the opened store.
      synset: the synthetic set about to be trained on (compared by :func:`synset_fingerprint`).
      teacher: a ``ddjax.sre2l.teacher.Teacher`` (compared by :func:`teacher_fingerprint`).
      dataset: the dataset (compared by :func:`dataset_fingerprint`).

    Raises:
      DDJaxError: one line naming what differs.
    """
    index = store.index
    if dataset is not None:
        mine = dataset_fingerprint(dataset)
        theirs = index["dataset"]
        if mine["sha256"] != theirs.get("sha256"):
            field = next((k for k in mine if k != "sha256" and mine[k] != theirs.get(k)), "data")
            raise DDJaxError(
                f"relabel store {store.path} was made for dataset {theirs.get('name')!r} with "
                f"{field}={theirs.get(field)!r}; this run has {field}={mine[field]!r}"
            )
    if synset is not None:
        mine = synset_fingerprint(synset)
        check(
            mine == index["synset_sha256"],
            f"relabel store {store.path} was made for another synthetic set (fingerprint "
            f"{index['synset_sha256']}, this one is {mine}); relabel this set first",
        )
    if teacher is not None:
        mine = teacher_fingerprint(teacher.model, teacher.variables)
        check(
            mine == index["teacher_sha256"],
            f"relabel store {store.path} was made with another teacher (fingerprint "
            f"{index['teacher_sha256']}, this one is {mine})",
        )


def _read_epoch(store: LabelStore, epoch: int) -> dict[str, np.ndarray]:
    check(
        isinstance(epoch, int | np.integer) and 0 <= epoch,
        f"epoch={epoch!r} must be a non-negative integer",
    )
    file = store.epoch_file(epoch)
    if not file.is_file():
        done = store.completed_epochs
        held = f"epochs {done[0]}-{done[-1]}" if done else "no epochs"
        raise DDJaxError(
            f"relabel store {store.path} has no labels for epoch {epoch} ({file.name} missing; "
            f"it holds {held} of {store.epochs}); re-run ddjax relabel on the same workdir"
        )
    try:
        with np.load(file, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise DDJaxError(f"{file} cannot be read ({e}); delete it and re-run relabel") from None
    n, c = store.num_images, store.num_classes
    batches = -(-n // store.batch_size)
    expected = {
        "boxes": (n, 4),
        "flips": (n,),
        "mix_perm": (n,),
        "mix_lam": (batches,),
        "mix_bbox": (batches, 4),
        "logits": (n, c),
        "epoch": (),
    }
    for name, shape in expected.items():
        check(
            name in arrays and arrays[name].shape == shape,
            f"{file} is not epoch {epoch} of this store ({name}: expected shape {shape}, got "
            f"{arrays[name].shape if name in arrays else 'nothing'})",
        )
    check(int(arrays["epoch"]) == epoch, f"{file} holds epoch {int(arrays['epoch'])}, not {epoch}")
    return arrays


def replay(store: LabelStore, epoch: int) -> list[BatchLabels]:
    """The stored batches of ``epoch``, in order: indices, crops, flips, mix and fp16 logits.

    The indices are rebuilt with :func:`ddjax.sre2l.views.batch_map` from the store's seed (FKD's
    ``get_img2batch_idx_list``); everything else is read from ``epoch_NNNN.npz``.

    Args:
      store: from :func:`open_store`.
      epoch: 0-based epoch.

    Returns:
      One :class:`BatchLabels` per batch.

    Raises:
      DDJaxError: the epoch's file is missing, unreadable or of another shape.
    """
    arrays = _read_epoch(store, epoch)
    batches = []
    start = 0
    for b, indices in enumerate(batch_map(store.num_images, store.batch_size, store.seed, epoch)):
        stop = start + indices.shape[0]
        augment = BatchAugment(
            boxes=arrays["boxes"][start:stop],
            flips=arrays["flips"][start:stop],
            mix_perm=arrays["mix_perm"][start:stop],
            mix_lam=arrays["mix_lam"][b],
            mix_bbox=arrays["mix_bbox"][b],
        )
        batches.append(BatchLabels(indices, augment, arrays["logits"][start:stop]))
        start = stop
    return batches


def augmented_batch(images: Any, batch: BatchLabels, spec: AugmentSpec) -> Array:
    """Re-applies a stored batch's augmentation to the synthetic images (FKD's training view).

    Args:
      images: ``(N, H, W, C)`` the whole synthetic set (the one the store was made from), or
        a synthetic folder's lazy images (only the batch's files are read).
      batch: one entry of :func:`replay`.
      spec: the store's augmentation (``store.spec``).

    Returns:
      ``(B, H, W, C)``: exactly the images the stored logits were computed on.
    """
    images = images if isinstance(images, FolderImages) else jnp.asarray(images)
    return augmenter(spec)(gather(images, batch.indices), batch.augment)


def _index(
    synset: SyntheticSet | SynFolder,
    teacher: Any,
    dataset: Dataset | DataContract,
    spec: AugmentSpec,
    teacher_mode: str,
    epochs: int,
    batch_size: int,
    seed: int,
) -> dict:
    return {
        "format": FORMAT,
        "kind": "ddjax relabel store (FKD-style soft labels)",
        "dataset": dataset_fingerprint(dataset),
        "synset_sha256": synset_fingerprint(synset),
        "teacher_sha256": teacher_fingerprint(teacher.model, teacher.variables),
        "teacher_path": str(teacher.meta.get("path", "")) if hasattr(teacher, "meta") else "",
        "num_images": int(len(synset.labels)),
        "num_classes": int(dataset.num_classes),
        "image_shape": list(dataset.image_shape),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "epochs": int(epochs),
        "augment": spec.to_json(),
        "teacher_mode": teacher_mode,
        "logits_dtype": "float16",
        "epoch_bytes": {},
        "storage_bytes": 0,
    }


def write_store(
    path: str | os.PathLike,
    synset: SyntheticSet,
    teacher: Any,
    dataset: Dataset | DataContract,
    *,
    spec: AugmentSpec,
    epochs: int,
    batch_size: int,
    seed: int = 42,
    teacher_mode: str = "eval",
    progress: bool = False,
    log: Log | None = None,
) -> dict:
    """Makes (or completes) a relabel store: FKD's ``generate_soft_label.py`` on arrays.

    For every epoch without a file: the batches of :func:`ddjax.sre2l.views.batch_map`, each
    labelled by :func:`~ddjax.sre2l.views.make_labeller` with
    :func:`~ddjax.sre2l.views.batch_key`, written as one ``epoch_NNNN.npz`` (temporary
    name, then rename) and recorded in ``relabel.json``. Re-running on the same directory
    continues with the missing epochs; a store made with other settings is refused. ``epochs``
    may grow between runs (every epoch is independent), which extends the store.

    Args:
      path: the store directory (created).
      synset: the synthetic set to label (images in ``dataset``'s space).
      teacher: a ``ddjax.sre2l.teacher.Teacher`` (``model``, ``variables``, ``meta``).
      dataset: the dataset the synset and teacher belong to (only its description is used:
        a ``DataContract`` from the teacher's ``teacher.json`` serves as well).
      spec: the augmentation (FKD: ``AugmentSpec()`` = RRC (0.08, 1) + flip + CutMix).
      epochs: epochs of labels (FKD: 300; the student trains at most this many).
      batch_size: FKD's ``-b 1024``; training must use the same batch size.
      seed: FKD's ``--fkd-seed 42``.
      teacher_mode: ``'eval'`` (FKD) or ``'train'`` (see :func:`ddjax.sre2l.views.teacher_logits`).
      progress: show a progress bar over epochs.
      log: called as ``log(event='relabel_epoch', epoch=..., bytes=..., seconds=...)``
        after each epoch is on disk.

    Returns:
      ``{'path', 'epochs', 'completed_epochs', 'batch_size', 'seed', 'storage_bytes',
      'index_bytes', 'seconds'}``; ``storage_bytes`` is the epoch files' total size (also in
      ``relabel.json``), ``index_bytes`` the size of ``relabel.json``.

    Raises:
      DDJaxError: bad settings, a teacher that does not fit the images, or an existing store
        made with other settings.
    """
    check_positive("epochs", epochs)
    check_positive("batch_size", batch_size)
    check(isinstance(seed, int | np.integer), f"seed={seed!r} must be an integer")
    check(
        teacher_mode in TEACHER_MODES,
        f"teacher_mode={teacher_mode!r} is not known; valid: {list(TEACHER_MODES)}",
    )
    images = synset.images
    if not isinstance(images, FolderImages):
        images = np.asarray(images, np.float32)
    check(
        tuple(images.shape[1:]) == tuple(dataset.image_shape),
        f"synthetic images have shape {images.shape[1:]}, dataset {dataset.name!r} has "
        f"{dataset.image_shape}",
    )
    check_teacher_fits(teacher, dataset)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index = _index(synset, teacher, dataset, spec, teacher_mode, epochs, batch_size, seed)
    index_file = path / INDEX_FILE
    if index_file.exists():
        saved = open_store(path).index
        for field in _IDENTITY_FIELDS:
            if saved[field] != index[field]:
                raise DDJaxError(
                    f"relabel store {path} was made with {field}={_short(saved[field])}, this "
                    f"run has {field}={_short(index[field])}; use a new directory"
                )
    # A killed write; its epoch is redone below.
    leftovers = list(path.glob(f"*{loop.TMP_SUFFIX}"))
    distributed.on_primary(f"clean {path}", lambda: [leftover.unlink() for leftover in leftovers])
    done = set(_epochs_on_disk(path))
    # An epoch renamed into place just before a kill may be missing from the index.
    index["epoch_bytes"] = {
        str(e): os.path.getsize(path / f"epoch_{e:04d}.npz") for e in sorted(done)
    }
    index["storage_bytes"] = sum(index["epoch_bytes"].values())
    loop.atomic_write_json(index_file, index)

    label = make_labeller(teacher.model, spec, teacher_mode)
    variables = jax.tree.map(jnp.asarray, dict(teacher.variables))
    # An in-memory set goes to the device once; a folder is read batch by batch.
    device_images = images if isinstance(images, FolderImages) else jnp.asarray(images)
    start = time.time()
    todo = [e for e in range(epochs) if e not in done]
    for epoch in loop.progress_bar(todo, progress=progress, desc="relabel", leave=False):
        epoch_start = time.time()
        arrays = _label_epoch(label, variables, device_images, batch_size, seed, epoch)
        file = path / f"epoch_{epoch:04d}.npz"
        loop.atomic_savez(file, **arrays)
        size = os.path.getsize(file)
        index["epoch_bytes"][str(epoch)] = size
        index["storage_bytes"] = sum(index["epoch_bytes"].values())
        loop.atomic_write_json(index_file, index)
        if log is not None:
            log(event="relabel_epoch", epoch=epoch, bytes=size, seconds=time.time() - epoch_start)
    return {
        "path": str(path),
        "epochs": int(epochs),
        "completed_epochs": len(_epochs_on_disk(path)),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "storage_bytes": int(index["storage_bytes"]),
        "index_bytes": os.path.getsize(index_file),
        "seconds": round(time.time() - start, 3),
    }


def predict_storage(num_images: int, num_classes: int, batch_size: int, epochs: int) -> int:
    """The bytes of a finished store's epoch files, known before any is written.

    Each ``epoch_NNNN.npz`` holds N boxes (4 float32), flips (bool), partners (int32) and fp16
    logits (C per image), and per batch a λ (float32) and a box (4 int32): ``N·(2C + 21) +
    20·ceil(N/B)`` bytes, plus the zip and ``.npy`` headers (measured here on a tiny file of the
    same arrays: they do not depend on the sizes). ImageNet at IPC 50 (N = 50,000, C = 1,000,
    B = 1,024, 300 epochs): 30.3 GB (28.2 GiB). ``relabel.json`` is not counted.
    """
    for name, value in (("num_images", num_images), ("num_classes", num_classes),
                        ("batch_size", batch_size), ("epochs", epochs)):  # fmt: skip
        check_positive(name, value)
    batches = -(-num_images // batch_size)
    payload = num_images * (2 * num_classes + 4 * 4 + 1 + 4) + batches * (4 + 4 * 4) + 4
    return epochs * (_epoch_overhead() + payload)


@functools.lru_cache(maxsize=1)
def _epoch_overhead() -> int:
    tiny = {
        "boxes": np.zeros((1, 4), np.float32),
        "flips": np.zeros((1,), bool),
        "mix_perm": np.zeros((1,), np.int32),
        "mix_lam": np.zeros((1,), np.float32),
        "mix_bbox": np.zeros((1, 4), np.int32),
        "logits": np.zeros((1, 1), np.float16),
        "epoch": np.int32(0),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **tiny)
    return len(buffer.getvalue()) - sum(np.asarray(a).nbytes for a in tiny.values())


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _label_epoch(
    label, variables: Any, images: Any, batch_size: int, seed: int, epoch: int
) -> dict[str, np.ndarray]:
    """All batches of one epoch, labelled and stacked in batch order.

    Only one batch of images is gathered at a time (a folder's files are decoded while the
    device labels the previous batch: dispatch is asynchronous); what the epoch keeps is its
    augmentation parameters and fp16 logits.
    """
    parts = []
    for b, indices in enumerate(batch_map(images.shape[0], batch_size, seed, epoch)):
        batch = gather(images, indices)
        augment, _, logits = label(variables, batch, batch_key(seed, epoch, b))
        parts.append((augment, logits.astype(jnp.float16)))
    parts = distributed.to_host(parts)
    augments = [p[0] for p in parts]
    return {
        "boxes": np.concatenate([a.boxes for a in augments]).astype(np.float32),
        "flips": np.concatenate([a.flips for a in augments]).astype(bool),
        "mix_perm": np.concatenate([a.mix_perm for a in augments]).astype(np.int32),
        "mix_lam": np.stack([a.mix_lam for a in augments]).astype(np.float32),
        "mix_bbox": np.stack([a.mix_bbox for a in augments]).astype(np.int32),
        "logits": np.concatenate([p[1] for p in parts]).astype(np.float16),
        "epoch": np.int32(epoch),
    }
