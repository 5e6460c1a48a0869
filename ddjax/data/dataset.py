"""The dataset record every source ends up in, and the check that a dataset can give ``ipc``.

Promises: a :class:`Dataset` is validated when it is built (float32 NHWC images, int32 labels of
matching length, one mean/std value per channel), is immutable, and knows how to turn its images
back into displayable pixels (:meth:`Dataset.to_pixels`) whether it was normalised or whitened.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ddjax.data.zca import ZCA
from ddjax.errors import check


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset held in memory.

    Attributes:
        name: the source name it was loaded from (e.g. ``'cifar10'``, ``'npz:/data/x.npz'``).
        x_train: ``(N, H, W, C)`` float32 train images, normalised (or ZCA-whitened).
        y_train: ``(N,)`` int32 train labels in ``[0, num_classes)``.
        x_test: ``(M, H, W, C)`` float32 test images, transformed like the train images.
        y_test: ``(M,)`` int32 test labels.
        class_names: one name per class.
        mean: per-channel mean subtracted from images in [0, 1] (zeros with ZCA).
        std: per-channel standard deviation divided by (ones with ZCA).
        zca: the ZCA fitted on the train images, or None.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None = None

    def __post_init__(self) -> None:
        for field in ("x_train", "x_test"):
            images = getattr(self, field)
            check(
                images.ndim == 4 and images.dtype == np.float32,
                f"{self.name}: {field} must be float32 NHWC, got {images.dtype} {images.shape}",
            )
        check(
            self.x_test.shape[1:] == self.x_train.shape[1:],
            f"{self.name}: x_test images are {self.x_test.shape[1:]}, "
            f"x_train images are {self.x_train.shape[1:]}",
        )
        for images, labels, split in (
            (self.x_train, self.y_train, "train"),
            (self.x_test, self.y_test, "test"),
        ):
            check(
                labels.shape == (images.shape[0],) and labels.dtype == np.int32,
                f"{self.name}: y_{split} must be int32 of shape ({images.shape[0]},), "
                f"got {labels.dtype} {labels.shape}",
            )
        channels = self.x_train.shape[-1]
        check(
            len(self.mean) == channels and len(self.std) == channels,
            f"{self.name}: mean/std need {channels} values, got {self.mean} / {self.std}",
        )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        height, width, channels = self.x_train.shape[1:]
        return height, width, channels

    def to_pixels(self, images: np.ndarray) -> np.ndarray:
        """Maps images in this dataset's space back to displayable pixels.

        Undoes the ZCA (if any) or the mean/std normalisation and clips, for pictures of
        synthetic sets. Works on any ``(..., H, W, C)`` array, e.g. NumPy or JAX arrays.

        Args:
            images: ``(..., H, W, C)`` images normalised (or whitened) like ``x_train``.

        Returns:
            float32 array of the same shape with values in [0, 1].
        """
        images = np.asarray(images, dtype=np.float32)
        check(
            images.ndim >= 3 and images.shape[-3:] == self.image_shape,
            f"{self.name}: to_pixels expects (..., {', '.join(map(str, self.image_shape))}) "
            f"images, got shape {images.shape}",
        )
        if self.zca is not None:
            pixels = self.zca.inverse(images.reshape(-1, *self.image_shape)).reshape(images.shape)
        else:
            pixels = images * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        return np.clip(pixels, 0.0, 1.0)

    def class_indices(self, c: int) -> np.ndarray:
        """Indices into ``x_train``/``y_train`` of the images of class ``c``, in order.

        Args:
            c: class index in ``[0, num_classes)``.

        Returns:
            int64 array of train indices.
        """
        check(
            0 <= c < self.num_classes,
            f"{self.name}: class {c} does not exist (valid: 0..{self.num_classes - 1})",
        )
        return np.flatnonzero(self.y_train == c)


def check_ipc(dataset: Dataset, ipc: int) -> None:
    """Checks that every class has at least ``ipc`` train images.

    Selection and distillation initialise ``ipc`` images per class from real ones, so this is
    checked before any work starts.

    Args:
        dataset: the dataset to draw from.
        ipc: images per class requested.

    Raises:
        DDJaxError: naming the smallest class and its size when it has fewer than ``ipc`` images.
    """
    check(
        isinstance(ipc, int | np.integer) and ipc >= 1, f"ipc must be an integer >= 1, got {ipc!r}"
    )
    counts = np.bincount(dataset.y_train, minlength=dataset.num_classes)
    smallest = int(np.argmin(counts))
    check(
        ipc <= counts[smallest],
        f"ipc={ipc} is larger than the smallest class (class {smallest} "
        f"'{dataset.class_names[smallest]}' has {counts[smallest]} train images)",
    )
