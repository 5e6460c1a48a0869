"""Pixel scaling and normalisation constants: what every image goes through before training.

Promises: :data:`NORMALISATION` holds the published per-channel constants (those of the DC/MTT
code, so that accuracies are comparable); :func:`to_unit_interval` turns uint8 or float images
into a fresh float32 copy in [0, 1] and refuses anything else with a message naming the field;
:func:`channel_statistics` computes a split's own constants for sources without published ones.
"""

from __future__ import annotations

import numpy as np

from ddjax.errors import DDJaxError, check

# Per-channel (mean, std) of images in [0, 1], as used by the published code.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # DC repo (Zhao et al.) utils.get_dataset; MTT's loader has no MNIST-family datasets.
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2861,), (0.3530,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    # MTT utils.get_dataset (also TESLA, DATM, SelMatch).
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # MTT reuses the CIFAR-10 statistics for CIFAR-100; reproduced so that results are comparable
    # with MTT and its successors. (The DC repo uses (0.5071, 0.4866, 0.4409) /
    # (0.2673, 0.2564, 0.2762) instead.)
    "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # MTT uses the ImageNet statistics for Tiny-ImageNet (SelMatch uses Tiny's own). Not a source
    # name: pass ``normalisation='tiny_imagenet'`` with ``folder:PATH``.
    "tiny_imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # torchvision's ImageNet statistics (the ImageNet reference scripts, SRe2L). Streams of
    # TFDS ImageNet datasets (``stream:imagenet2012``) use them; pass
    # ``normalisation='imagenet'`` with ``stream:folder:PATH``.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Not published: computed once from ddjax's fixed digits train split (pixel values / 16) and
    # rounded like the others; tests/test_data.py checks that they still match.
    "digits": ((0.3057,), (0.3762,)),
}


def to_unit_interval(images: np.ndarray, field: str) -> np.ndarray:
    """Returns a fresh float32 copy in [0, 1] of uint8 (0..255) or float ([0, 1]) images."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255)
    check(
        np.issubdtype(images.dtype, np.floating),
        f"{field} has dtype {images.dtype}; use uint8 in 0..255 or floats in [0, 1]",
    )
    finite = np.isfinite(images)
    if not finite.all():
        index = np.unravel_index(np.argmin(finite), images.shape)
        raise DDJaxError(f"{field} holds a non-finite value ({images[index]}) at index {index}")
    if images.size:
        low, high = float(images.min()), float(images.max())
        check(
            low >= 0.0 and high <= 1.0,
            f"{field} values span [{low:g}, {high:g}]; floats must lie in [0, 1] "
            "(or store uint8 in 0..255)",
        )
    return images.astype(np.float32, copy=True)


def channel_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation, accumulated in float64."""
    flat = images.reshape(-1, images.shape[-1])
    total = np.zeros(flat.shape[1])
    squares = np.zeros(flat.shape[1])
    for start in range(0, len(flat), 1 << 20):
        chunk = flat[start : start + (1 << 20)].astype(np.float64)
        total += chunk.sum(axis=0)
        squares += (chunk**2).sum(axis=0)
    mean = total / len(flat)
    std = np.sqrt(np.maximum(squares / len(flat) - mean**2, 0.0))
    # A constant channel carries no information; dividing by 1 keeps it finite (zero).
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(mean.tolist()), tuple(std.tolist())
