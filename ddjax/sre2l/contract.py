"""The data contract of SRe2L's stages: the teacher's input space, without its images.

Recover and relabel need the image shape, the number of classes and the mean/std
normalisation the teacher was trained in, not the images themselves; at ImageNet scale they run
from the contract a teacher records in its ``teacher.json`` (``config.dataset.name`` empty).
A loaded :class:`ddjax.data.Dataset` provides the same fields, so functions that only read
them take either (``Dataset | DataContract``). A teacher imported from PyTorch is described by a
contract built from the published facts (:meth:`DataContract.named`: ImageNet-1K is 1,000
classes at 224 px with ImageNet's mean/std) instead of a dataset ddjax loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ddjax.data import NORMALISATION, Dataset
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

    def __post_init__(self) -> None:
        check(
            isinstance(self.name, str) and bool(self.name),
            f"DataContract.name must be a non-empty dataset name, got {self.name!r}",
        )
        shape = tuple(self.image_shape)
        check(
            len(shape) == 3 and all(_positive_int(s) for s in shape),
            f"DataContract.image_shape must be (height, width, channels) of positive integers, "
            f"got {self.image_shape!r}",
        )
        check(
            _positive_int(self.num_classes),
            f"DataContract.num_classes must be a positive integer, got {self.num_classes!r}",
        )
        for field in ("mean", "std"):
            values = tuple(getattr(self, field))
            check(
                len(values) == shape[-1],
                f"DataContract.{field} has {len(values)} values for {shape[-1]}-channel images",
            )
        check(
            all(float(s) > 0 for s in self.std),
            f"DataContract.std must be positive, got {tuple(self.std)}",
        )
        # Plain tuples of Python numbers: contracts compare equal whatever built them (a list
        # from teacher.json, numpy scalars from a dataset).
        object.__setattr__(self, "image_shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def zca(self) -> None:
        """Always ``None``: SRe2L's data is mean/std-normalised (as a ``Dataset`` without ZCA, for
        code that reads either)."""
        return None

    @classmethod
    def named(
        cls, name: str, image_shape: tuple[int, int, int], num_classes: int, normalisation: str
    ) -> DataContract:
        """The contract of data normalised with the published constants ``normalisation``.

        Args:
            name: the dataset name the teacher is recorded for (checked against the data of
                later stages), e.g. ``'stream:imagenet2012'``.
            image_shape: ``(H, W, C)``.
            num_classes: number of classes.
            normalisation: a key of :data:`ddjax.data.NORMALISATION`, e.g. ``'imagenet'``.

        Raises:
            DDJaxError: an unknown normalisation or invalid fields.
        """
        check(
            normalisation in NORMALISATION,
            f"normalisation={normalisation!r} is unknown; use one of {sorted(NORMALISATION)}",
        )
        mean, std = NORMALISATION[normalisation]
        return cls(name, image_shape, num_classes, mean, std)

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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0
