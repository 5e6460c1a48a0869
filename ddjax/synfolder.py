"""A synthetic set as a folder of image files, ImageNet's layout: one file per image.

SRe2L (Yin, Xing & Shen, NeurIPS 2023) saves its recovered ImageNet set as JPEG files, one
class folder each, and its relabel and validation scripts read them back with an image-folder
loader. At ImageNet's IPC 50 the set is 50,000 images of 224 px: 30 GB as float32, about 1 GB
as JPEG. ddjax's ``ddjax recover`` writes such a folder batch by batch (``config.output =
'folder'``), and ``ddjax relabel`` and the KD students read only the images of the batch in
hand (:meth:`SynFolder.take`), so no stage holds the whole set in memory.

Layout of a folder ``ROOT``::

    ROOT/synset.json              what the set is: classes, ipc, image shape, normalisation,
                                  format, provenance (written first)
    ROOT/.done/batch_NNNNN.json   one per finished batch: its images' files and SHA-256s and
                                  the batch's final losses (written after its images)
    ROOT/CCC/III.jpg              class CCC's image III (zero-padded; ``.png`` when lossless)

Class folders sort in class order, so ``ROOT`` is also a plain ImageNet-layout dataset: an
image-folder loader (``torchvision.datasets.ImageFolder``, ddjax's ``folder:ROOT``) gives
image ``III.jpg`` of folder ``CCC`` the label ``CCC``. The ``.done`` folder is hidden from such
loaders. An image is written to a temporary name and renamed, and a batch counts as done only
once its record is on disk, so a killed writer leaves either a whole batch or one to redo.

**Pixels.** Images are stored as SRe2L stores them: de-normalised, clipped to [0, 1],
``uint8(floor(255·x))`` (the reference's ``(x * 255).astype(np.uint8)``), then JPEG at PIL's
quality (75 as published) or lossless PNG. Reading gives ``(code / 255 − mean) / std`` in
float32: the JPEG round trip of :func:`ddjax.sre2l.recover_step.jpeg_round_trip` exactly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from ddjax import distributed, guard, loop
from ddjax.errors import DDJaxError, check

__all__ = [
    "DONE_DIR",
    "FORMATS",
    "INDEX_FILE",
    "SynFolder",
    "SynFolderWriter",
    "encode_images",
    "is_synfolder",
    "open_synfolder",
    "to_codes",
]

INDEX_FILE = "synset.json"
DONE_DIR = ".done"
FORMAT_VERSION = 1
#: image format -> file suffix
FORMATS = {"jpeg": "jpg", "png": "png"}
#: the fields of ``synset.json`` that a resumed writer must find unchanged
_IDENTITY = ("version", "num_classes", "ipc", "image_shape", "mean", "std", "image_format",
             "jpeg_quality")  # fmt: skip


def _width(count: int) -> int:
    return max(3, len(str(max(count - 1, 0))))


def image_path(num_classes: int, ipc: int, label: int, ipc_id: int, image_format: str) -> str:
    """``'CCC/III.jpg'``: where class ``label``'s image ``ipc_id`` lives (relative path)."""
    return f"{label:0{_width(num_classes)}d}/{ipc_id:0{_width(ipc)}d}.{FORMATS[image_format]}"


def to_codes(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised float images -> SRe2L's saved ``uint8(floor(255·clip(x·s + m, 0, 1)))``."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    pixels = np.clip(np.asarray(images, np.float32) * std + mean, 0.0, 1.0)
    return (pixels * 255).astype(np.uint8)


def encode_images(codes: np.ndarray, image_format: str, jpeg_quality: int = 75) -> list[bytes]:
    """``(N, H, W, C)`` uint8 codes -> one encoded file each (JPEG at ``jpeg_quality``, or PNG)."""
    files = []
    for image in codes:
        mode = "L" if image.shape[-1] == 1 else "RGB"
        buffer = io.BytesIO()
        picture = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
        if image_format == "jpeg":
            picture.save(buffer, format="JPEG", quality=int(jpeg_quality))
        else:
            picture.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def _decode(data: bytes, channels: int, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError) as e:
        raise DDJaxError(f"{where}: cannot decode image ({e}); re-run recover") from None
    return array[..., None] if channels == 1 else array


def is_synfolder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :class:`SynFolderWriter` (holds ``synset.json``)."""
    return (Path(path) / INDEX_FILE).is_file()


class SynFolderWriter:
    """Writes a synthetic set into a folder, batch by batch, resumably.

    Args:
        root: the folder (created).
        num_classes: classes of the dataset.
        ipc: images per class.
        image_shape: ``(H, W, C)``, C = 1 or 3.
        mean: the normalisation mean the images are expressed in.
        std: its standard deviation.
        image_format: ``'jpeg'`` (SRe2L's) or ``'png'`` (lossless).
        jpeg_quality: PIL quality 1..95 for JPEG (SRe2L: PIL's default 75).
        meta: provenance recorded in ``synset.json`` (method, teacher, seed, ...).

    Raises:
        DDJaxError: bad arguments, or a folder holding another set (other classes, ipc,
            shape, normalisation or format).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        num_classes: int,
        ipc: int,
        image_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        image_format: str = "jpeg",
        jpeg_quality: int = 75,
        meta: Mapping[str, Any] | None = None,
    ):
        check(
            image_format in FORMATS,
            f"image_format={image_format!r} is not known; valid: {list(FORMATS)}",
        )
        check(
            image_format != "jpeg" or (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 95),
            f"jpeg_quality={jpeg_quality!r} must be 1..95 (SRe2L: 75)",
        )
        check(
            len(image_shape) == 3 and image_shape[-1] in (1, 3),
            f"image_shape={tuple(image_shape)} must be (H, W, C) with C = 1 or 3",
        )
        self.root = Path(root)
        self.index = {
            "version": FORMAT_VERSION,
            "num_classes": int(num_classes),
            "ipc": int(ipc),
            "image_shape": [int(s) for s in image_shape],
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "image_format": image_format,
            "jpeg_quality": int(jpeg_quality) if image_format == "jpeg" else None,
            "meta": dict(meta or {}),
        }
        index_file = self.root / INDEX_FILE
        if index_file.is_file():
            saved = loop.read_json(index_file, what=f"the synthetic folder {self.root}")
            for field in _IDENTITY:
                if saved.get(field) != self.index[field]:
                    raise DDJaxError(
                        f"{self.root} holds a synthetic set with {field}={saved.get(field)!r}, "
                        f"this run writes {field}={self.index[field]!r}; use another folder"
                    )
        else:
            distributed.on_primary(
                f"create {self.root}",
                lambda: (self.root / DONE_DIR).mkdir(parents=True, exist_ok=True),
            )
            loop.atomic_write_json(index_file, self.index)

    def _record_file(self, batch: int) -> Path:
        return self.root / DONE_DIR / f"batch_{batch:05d}.json"

    def done(self, batch: int) -> dict | None:
        """The record of a finished batch (its files, SHA-256s and ``extra``), or ``None``."""
        file = self._record_file(batch)
        if not file.is_file():
            return None
        return loop.read_json(file, what=f"batch {batch} of the synthetic folder {self.root}")

    def write_batch(
        self,
        batch: int,
        labels: np.ndarray,
        ipc_ids: np.ndarray,
        images: np.ndarray,
        extra: Mapping[str, Any] | None = None,
    ) -> dict:
        """Writes one batch's images (normalised float, ``(N, H, W, C)``), then its record.

        Image ``k`` goes to :func:`image_path` of ``(labels[k], ipc_ids[k])``. In a
        multi-process run every process calls this with the same arguments and process 0
        writes. Returns the record (also in ``.done/batch_NNNNN.json``).
        """
        index = self.index
        check(
            tuple(images.shape[1:]) == tuple(index["image_shape"]),
            f"batch {batch}: images of shape {images.shape[1:]}, the folder holds "
            f"{tuple(index['image_shape'])}",
        )
        guard.check_finite(
            images, f"batch {batch} of the synthetic folder {self.root}", "it is not written"
        )
        codes = to_codes(images, index["mean"], index["std"])
        files = encode_images(codes, index["image_format"], index["jpeg_quality"] or 75)
        names = [
            image_path(index["num_classes"], index["ipc"], int(c), int(i), index["image_format"])
            for c, i in zip(labels, ipc_ids, strict=True)
        ]

        def write() -> None:
            for name, data in zip(names, files, strict=True):
                path = self.root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(path.name + loop.TMP_SUFFIX)
                temporary.write_bytes(data)
                os.replace(temporary, path)

        distributed.on_primary(f"batch {batch} of {self.root}", write)
        record = {
            "batch": int(batch),
            "files": names,
            "sha256": [hashlib.sha256(data).hexdigest() for data in files],
            "bytes": int(sum(len(data) for data in files)),
            **dict(extra or {}),
        }
        loop.atomic_write_json(self._record_file(batch), record)
        return record


@dataclasses.dataclass(frozen=True, eq=False)
class SynFolder:
    """A finished synthetic folder, read lazily: images are decoded only when taken.

    Attributes:
        root: the folder.
        num_classes: classes.
        ipc: images per class.
        image_shape: ``(H, W, C)``.
        mean: normalisation mean.
        std: normalisation standard deviation.
        image_format: ``'jpeg'`` or ``'png'``.
        files: relative paths, in set order (class 0's ``ipc`` images first, as
            :class:`ddjax.synset.SyntheticSet` orders a recovered set).
        labels: ``(N,)`` int32 classes, in the same order.
        meta: provenance from ``synset.json``.
        digests: every file's SHA-256 as recorded when it was written; :meth:`take` checks
            each file it reads against it, so a file changed since is an error, not a silent
            mismatch with the labels made from it.
        fingerprint: SHA-256 over ``digests``: what a relabel store made from this folder is
            tied to.
        bytes: total size of the image files.
        workers: threads decoding the files of one :meth:`take`.
    """

    root: Path
    num_classes: int
    ipc: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_format: str
    files: tuple[str, ...]
    labels: np.ndarray
    meta: dict
    digests: tuple[str, ...]
    fingerprint: str
    bytes: int
    workers: int = 8

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_images(self) -> int:
        return len(self.files)

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images ``indices`` (set order), decoded and normalised: ``(n, H, W, C)`` float32.

        Files are decoded by a pool of threads (PIL releases the GIL while decoding).
        """
        indices = np.asarray(indices, np.int64).reshape(-1)
        check(
            indices.size == 0 or (indices.min() >= 0 and indices.max() < len(self.files)),
            f"{self.root}: image indices must be in 0..{len(self.files) - 1}",
        )
        channels = self.image_shape[-1]

        def read(i: int) -> np.ndarray:
            path = self.root / self.files[i]
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DDJaxError(f"{path}: cannot read ({e.strerror}); re-run recover") from None
            check(
                hashlib.sha256(data).hexdigest() == self.digests[i],
                f"{path} changed since ddjax recover wrote it (SHA-256 differs from "
                f"{self.root / DONE_DIR}); restore it or re-run recover into a new folder",
            )
            array = _decode(data, channels, str(path))
            check(
                array.shape == self.image_shape,
                f"{path} is {array.shape[1]}x{array.shape[0]}x{array.shape[2]}, the set's images "
                f"are {self.image_shape[1]}x{self.image_shape[0]}x{channels}",
            )
            return array

        if len(indices) > 1 and self.workers > 1:
            with concurrent.futures.ThreadPoolExecutor(min(self.workers, len(indices))) as pool:
                codes = list(pool.map(read, indices.tolist()))
        else:
            codes = [read(i) for i in indices.tolist()]
        codes = np.stack(codes) if codes else np.zeros((0, *self.image_shape), np.uint8)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return ((codes.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)

    def take_placed(
        self, indices: Sequence[int] | np.ndarray, where: jax.sharding.Sharding | None
    ) -> jax.Array:
        """Images ``indices`` as one array placed on ``where`` (a sharding over the batch).

        Each process decodes only the rows its devices hold, so a batch sharded over several
        hosts is read once in all, not once per host. ``where=None``: the default device.
        """
        indices = np.asarray(indices, np.int64).reshape(-1)
        if where is None:
            return jax.device_put(self.take(indices), distributed.local_device())
        shape = (len(indices), *self.image_shape)
        return jax.make_array_from_callback(
            shape, where, lambda index: self.take(indices[index[0]])
        )

    def all_images(self) -> np.ndarray:
        """Every image in memory (small sets only: ``ddjax evaluate``, tests)."""
        return self.take(np.arange(len(self.files)))

    @property
    def images(self) -> FolderImages:
        """The images as a lazy ``(N, H, W, C)`` float32 array-like (see :class:`FolderImages`)."""
        return FolderImages(self)


class FolderImages:
    """A :class:`SynFolder`'s images as an array-like that decodes only what is indexed.

    It has ``shape``, ``ndim``, ``dtype`` and ``len`` like the ``(N, H, W, C)`` float32 array of
    an in-memory set, and ``images[indices]`` decodes those images. Converting it whole
    (``np.asarray``) is refused: code that reads a folder set must gather batches
    (:func:`ddjax.sre2l.views.gather`), so a 50,000-image set never becomes one array by
    accident.
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, folder: SynFolder):
        self.folder = folder
        self.shape = (len(folder.files), *folder.image_shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices: Any) -> np.ndarray:
        return self.folder.take(np.arange(self.shape[0])[indices])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise DDJaxError(
            f"the synthetic folder {self.folder.root} is read batch by batch; this code path "
            "needs the whole set in memory (use a synset.npz, or a stage that streams folders)"
        )


def _read_records(root: Path, what: str) -> list[dict]:
    done = root / DONE_DIR
    names = sorted(p.name for p in done.glob("batch_*.json")) if done.is_dir() else []
    return [loop.read_json(done / name, what=what) for name in names]


def open_synfolder(path: str | os.PathLike, *, workers: int = 8) -> SynFolder:
    """Opens a finished synthetic folder (reads its index and records; decodes no image).

    Raises:
        DDJaxError: not a synthetic folder, or an unfinished one (the images of some class
            and ipc index were never written: finish it by re-running ``ddjax recover``).
    """
    root = Path(path)
    check(
        is_synfolder(root),
        f"{root} is not a synthetic folder (no {INDEX_FILE}); give a folder written by "
        "ddjax recover with config.output='folder', or a synset.npz",
    )
    what = f"the synthetic folder {root}"
    index = loop.read_json(root / INDEX_FILE, what=what)
    check(
        index.get("version") == FORMAT_VERSION,
        f"{root / INDEX_FILE}: format version {index.get('version')!r}, this ddjax reads "
        f"{FORMAT_VERSION}",
    )
    num_classes, ipc = int(index["num_classes"]), int(index["ipc"])
    digests: dict[str, str] = {}
    total = 0
    for record in _read_records(root, what):
        digests.update(zip(record["files"], record["sha256"], strict=True))
        total += int(record.get("bytes", 0))
    fmt = index["image_format"]
    files, labels, missing = [], [], []
    for label in range(num_classes):
        for ipc_id in range(ipc):
            name = image_path(num_classes, ipc, label, ipc_id, fmt)
            (files if name in digests else missing).append(name)
            labels.append(label)
    check(
        not missing,
        f"{root} is unfinished: {len(missing)} of {num_classes * ipc} images are missing (first: "
        f"{missing[0] if missing else ''}); re-run ddjax recover on its work directory",
    )
    fingerprint = hashlib.sha256("\n".join(digests[f] for f in files).encode()).hexdigest()
    return SynFolder(
        root=root,
        num_classes=num_classes,
        ipc=ipc,
        image_shape=tuple(index["image_shape"]),
        mean=tuple(index["mean"]),
        std=tuple(index["std"]),
        image_format=fmt,
        files=tuple(files),
        labels=np.asarray(labels, np.int32),
        meta=dict(index.get("meta", {})),
        digests=tuple(digests[f] for f in files),
        fingerprint=fingerprint,
        bytes=total,
        workers=workers,
    )
