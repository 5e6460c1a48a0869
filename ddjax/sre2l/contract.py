"""The data contract of SRe2L's stages: the teacher's input space, without its images.

Recover and relabel need the image shape, the number of classes and the mean/std
normalisation the teacher was trained in, not the images themselves; at ImageNet scale they run
from the contract a teacher records in its ``teacher.json`` (``config.dataset.name`` empty).
A loaded :class:`ddjax.data.Dataset` provides the same fields, so functions that only read
them take either (``Dataset | DataContract``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ddjax.data import Dataset
from ddjax.errors import check

__all__ = ["DataContract"]


@dataclasses.dataclass(frozen=True)
class DataContract:
    """What recover needs to know about the data: the teacher's input space, not its images.

    Attributes:
        name: the dataset's source name.
        image_shape: ``(H, W, C)``.
        num_classes: number of classes.
        mean: per-channel normalisation mean (images in [0, 1] → ``(x − mean)/std``).
        std: per-channel normalisation standard deviation.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of_dataset(cls, dataset: Dataset) -> DataContract:
        """The contract of a loaded dataset."""
        return cls(
            dataset.name,
            tuple(dataset.image_shape),
            dataset.num_classes,
            tuple(float(m) for m in dataset.mean),
            tuple(float(s) for s in dataset.std),
        )

    @classmethod
    def of_teacher(cls, meta: Mapping[str, Any]) -> DataContract:
        """The contract recorded in a teacher's ``teacher.json`` (no images are read)."""
        check(
            not meta["zca"],
            f"teacher {meta.get('path', '')} was trained on ZCA-whitened data; SRe2L recovers in "
            "mean/std-normalised space",
        )
        return cls(
            str(meta["dataset"]),
            tuple(int(s) for s in meta["image_shape"]),
            int(meta["num_classes"]),
            tuple(float(m) for m in meta["mean"]),
            tuple(float(s) for s in meta["std"]),
        )

    def to_pixels(self, images: np.ndarray) -> np.ndarray:
        """Normalised images back to [0, 1] pixels (clipped), for pictures."""
        return np.clip(np.asarray(images) * np.array(self.std) + np.array(self.mean), 0.0, 1.0)
