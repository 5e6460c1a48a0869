"""The synthetic-set format that every ddjax method returns.

Coreset selection, trajectory matching and SRe2L all end in the same record: a
few images per class in the dataset's normalised (or ZCA-whitened) space, their
labels and, for methods that learn it, the learning rate the evaluation
networks should use (MTT's learned ``syn_lr``). It is saved as ``.npz`` with a
PNG grid beside it, and read back by ``ddjax evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ddjax import guard, loop, validate
from ddjax.errors import DDJaxError, check


@dataclasses.dataclass(frozen=True)
class SyntheticSet:
    """A distilled or selected dataset.

    Attributes:
      images: ``(N, H, W, C)`` float32 in the source dataset's normalised space.
      labels: ``(N,)`` int32 class indices, or ``(N, num_classes)`` float32 target
        probabilities (soft labels).
      learning_rate: learning rate for evaluation under the MTT protocol (the
        learned inner lr of trajectory matching); ``None`` when the method does
        not learn one.
      num_classes: number of classes of the source dataset.
      meta: free-form JSON-serialisable provenance (method, dataset, ipc, seed...).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    learning_rate: float | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check(
            self.images.ndim == 4, f"synthetic images must be NHWC, got shape {self.images.shape}"
        )
        check(
            self.labels.shape[0] == self.images.shape[0],
            f"synthetic set has {self.images.shape[0]} images but {self.labels.shape[0]} labels",
        )
        check(
            self.labels.ndim in (1, 2),
            f"synthetic labels must be (N,) class indices or (N, C) probabilities, "
            f"got shape {self.labels.shape}",
        )

    @property
    def hard_labels(self) -> np.ndarray:
        """Class indices (argmax of soft labels)."""
        if self.labels.ndim == 2:
            return np.argmax(self.labels, axis=1).astype(np.int32)
        return self.labels

    @property
    def ipc(self) -> int:
        """Images per class (of the most populated class)."""
        return int(np.bincount(self.hard_labels, minlength=self.num_classes).max())

    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``path`` (``.npz``) atomically: a killed run never leaves half a file.

        Nothing non-finite is written (:mod:`ddjax.guard`): a set with a NaN or inf image,
        label or learning rate is refused; a set without a learning rate stores none.

        Raises:
          DDJaxError: a non-finite value (nothing is written).
        """
        path = Path(path)
        arrays = {
            "images": np.asarray(self.images, np.float32),
            "labels": np.asarray(self.labels),
            "num_classes": np.int32(self.num_classes),
            "meta": np.array(json.dumps(self.meta, allow_nan=False)),
        }
        if self.learning_rate is not None:
            arrays["learning_rate"] = np.float64(self.learning_rate)
        guard.check_finite(
            arrays, f"the synthetic set for {path}", "it is not written (see ddjax.guard)"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        loop.atomic_savez(path, **arrays)
        return path


def load_synset(path: str | os.PathLike) -> SyntheticSet:
    """Reads a synthetic set written by :meth:`SyntheticSet.save`, or a synthetic folder.

    A folder written by ``ddjax recover`` (``output='folder'``, :mod:`ddjax.synfolder`) is
    decoded whole into memory with hard labels: for small folders (``ddjax evaluate``); the
    SRe2L stages read large ones batch by batch.
    """
    path = Path(path)
    if path.is_dir():
        from ddjax import synfolder  # noqa: PLC0415 -- only folder sets need it

        folder = synfolder.open_synfolder(path)
        synset = SyntheticSet(
            images=folder.all_images(),
            labels=folder.labels,
            num_classes=folder.num_classes,
            meta={**folder.meta, "folder": str(path)},
        )
    else:
        synset = _load_npz(path)
    validate.check_synset_values(synset.images, synset.labels, synset.num_classes, str(path))
    return synset


def _load_npz(path: Path) -> SyntheticSet:
    check(path.is_file(), f"synthetic set file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"images", "labels", "num_classes"} - set(f.files)
            check(not missing, f"{path}: not a ddjax synthetic set (missing {sorted(missing)})")
            # NaN is how save() writes "no learned lr"; inf or a negative value is kept, and
            # refused by the checks of load_synset.
            lr = float(f["learning_rate"]) if "learning_rate" in f.files else float("nan")
            meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
            images, labels = f["images"], f["labels"]
            check(
                np.issubdtype(images.dtype, np.number) and images.ndim == 4,
                f"{path}: images must be a 4-d (N, H, W, C) number array, got {images.dtype} "
                f"of shape {images.shape}",
            )
            check(
                np.issubdtype(labels.dtype, np.number) and labels.ndim in (1, 2),
                f"{path}: labels must be (N,) class indices or (N, C) probabilities, got "
                f"{labels.dtype} of shape {labels.shape}",
            )
            return SyntheticSet(
                images=images.astype(np.float32),
                labels=labels,
                num_classes=int(f["num_classes"]),
                learning_rate=None if np.isnan(lr) else lr,
                meta=meta,
            )
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as e:
        if isinstance(e, DDJaxError):
            raise
        raise DDJaxError(f"{path}: cannot read synthetic set ({e})") from None


def image_grid(pixels: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Arranges images in a grid with one row per class.

    Args:
      pixels: ``(N, H, W, C)`` values in [0, 1].
      labels: ``(N,)`` class indices.
      num_classes: number of rows.

    Returns:
      ``(rows*(H+1)+1, cols*(W+1)+1, C)`` float array with 1-px white separators.
    """
    n, h, w, c = pixels.shape
    per_class = [np.flatnonzero(labels == k) for k in range(num_classes)]
    cols = max(1, max(len(ix) for ix in per_class))
    grid = np.ones((num_classes * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
    for row, ix in enumerate(per_class):
        for col, i in enumerate(ix):
            y, x = 1 + row * (h + 1), 1 + col * (w + 1)
            grid[y : y + h, x : x + w] = pixels[i]
    return grid


def save_grid(
    path: str | os.PathLike,
    synset: SyntheticSet,
    to_pixels: Callable[[np.ndarray], np.ndarray],
    max_per_class: int = 10,
    upscale: int | None = None,
) -> Path:
    """Saves the synthetic images as a PNG grid (one row per class).

    Args:
      path: output ``.png`` path.
      synset: the set to draw.
      to_pixels: maps normalised images to [0, 1] pixels (``Dataset.to_pixels``,
        which inverts ZCA and the mean/std normalisation).
      max_per_class: at most this many images per class are drawn.
      upscale: integer nearest-neighbour zoom; by default small images are
        enlarged to about 32 px so that 8-px digits stay visible.
    """
    from PIL import Image

    labels = synset.hard_labels
    keep = np.concatenate(
        [np.flatnonzero(labels == k)[:max_per_class] for k in range(synset.num_classes)]
    ).astype(int)
    pixels = np.clip(to_pixels(np.asarray(synset.images)[keep]), 0.0, 1.0)
    grid = image_grid(pixels, labels[keep], synset.num_classes)
    if upscale is None:
        upscale = max(1, 32 // synset.images.shape[1])
    grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
    array = (grid * 255 + 0.5).astype(np.uint8)
    if array.shape[-1] == 1:
        array = array[..., 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with loop.atomic_file(path) as f:
        Image.fromarray(array).save(f, format="PNG")
    return path
