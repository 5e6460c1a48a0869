"""Random-resized crops, flips and rolls with torchvision's semantics, jittable and differentiable.

SRe2L's recover ("multi-crop optimisation", ``research/sre2l.md`` §3.3) and FKD's relabel
(§4) both draw torchvision ``RandomResizedCrop`` boxes and resample the crop bilinearly to a
fixed size. This module reproduces those pieces as pure functions of an explicit PRNG key and
NHWC images, with fixed output shapes so that a step using them compiles once:

* :func:`rrc_boxes` is ``RandomResizedCrop.get_params`` (10 tries of a random area fraction and
  a log-uniform aspect ratio, integer height/width rounded as torchvision rounds, a uniform
  integer offset; a centre-crop fallback), returned *normalised* as FKD stores crop
  coordinates: ``(top/H, left/W, h/H, w/W)``.
* :func:`resized_crop` resamples the integer pixel box of each image to ``out_height ×
  out_width`` with ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``
  semantics (torchvision ``resized_crop`` with ``antialias=False``, its tensor default up to
  torchvision 0.16, which SRe2L used). It is a weighted sum of input pixels, hence
  differentiable with respect to the images.
* :func:`flip` (``hflip``: reverses the width axis) and :func:`roll` (``torch.roll`` over H
  and W with wrap-around; the shifts may be traced).

Deliberate differences from torchvision: the random numbers come from JAX's PRNG (not torch's
generator), so boxes follow the same distribution but not the same values for a given seed;
the ten tries are all drawn up front and the first valid one is kept (the same distribution as
drawing them one at a time); ``antialias=True`` (torchvision ≥ 0.17's default for tensors) is
not reproduced, because the published runs did not use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ddjax.errors import check

__all__ = ["boxes_to_pixels", "flip", "resized_crop", "roll", "rrc_boxes"]

Array = jax.Array

#: torchvision ``RandomResizedCrop`` defaults.
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_TRIES = 10


def _check_size(name: str, value: int) -> None:
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name} must be a positive integer, got {value!r}",
    )


def _check_range(name: str, value: Sequence[float] | ArrayLike) -> None:
    if isinstance(value, Sequence):
        check(len(value) == 2, f"{name} must be a (low, high) pair, got {value!r}")
        low, high = value
        if all(isinstance(v, int | float) for v in (low, high)):
            check(0 < low <= high, f"{name}={tuple(value)} must satisfy 0 < low <= high")


def rrc_boxes(
    key: Array,
    num: int,
    height: int,
    width: int,
    scale: Sequence[float] | ArrayLike = DEFAULT_SCALE,
    ratio: Sequence[float] | ArrayLike = DEFAULT_RATIO,
) -> Array:
    """Draws ``num`` torchvision ``RandomResizedCrop.get_params`` boxes, normalised.

    For each box, up to 10 tries: ``area = H·W·U(scale)``, ``aspect = exp(U(log ratio))``,
    ``w = round(√(area·aspect))``, ``h = round(√(area/aspect))`` (round half to even, Python's
    ``round`` as torchvision uses it); the first try with ``0 < w ≤ W`` and ``0 < h ≤ H`` wins
    and gets ``top ~ U{0..H−h}``, ``left ~ U{0..W−w}``. If no try fits, the centre crop of the
    largest box whose aspect ratio lies in ``ratio`` (torchvision's fallback).

    Args:
        key: PRNG key.
        num: number of boxes (static).
        height: image height H in pixels (static).
        width: image width W in pixels (static).
        scale: (low, high) bounds of the area fraction; Python floats or traced scalars
            (e.g. CDA's annealed lower bound).
        ratio: (low, high) bounds of the aspect ratio w/h.

    Returns:
        ``(num, 4)`` float32 ``(top/H, left/W, h/H, w/W)``, FKD's stored crop coordinates;
        :func:`boxes_to_pixels` recovers the integers exactly.
    """
    for name, value in (("num", num), ("height", height), ("width", width)):
        _check_size(f"rrc_boxes {name}", value)
    _check_range("rrc_boxes scale", scale)
    _check_range("rrc_boxes ratio", ratio)
    scale_low, scale_high = (jnp.asarray(s, jnp.float32) for s in scale)
    ratio_low, ratio_high = (jnp.asarray(r, jnp.float32) for r in ratio)
    # One flat uniform draw (the threefry kernel dominates CPU compile time; see augment.py):
    # rows = area fraction, log-aspect, top offset, left offset; columns = tries.
    u = jax.random.uniform(key, (4 * num * _TRIES,)).reshape(4, num, _TRIES)
    area = height * width * (scale_low + (scale_high - scale_low) * u[0])
    log_low, log_high = jnp.log(ratio_low), jnp.log(ratio_high)
    aspect = jnp.exp(log_low + (log_high - log_low) * u[1])
    w = jnp.round(jnp.sqrt(area * aspect))
    h = jnp.round(jnp.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # torch.randint(0, H - h + 1): a uniform integer in [0, H - h].
    top = jnp.floor(u[2] * (height - h + 1))
    left = jnp.floor(u[3] * (width - w + 1))
    first = jnp.argmax(fits, axis=1)  # the first try that fits (0 if none; masked below)
    pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]  # noqa: E731
    any_fits = jnp.any(fits, axis=1)

    # Fallback: torchvision's centre crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    fallback_w = jnp.where(
        in_ratio < ratio_low,
        float(width),
        jnp.where(in_ratio > ratio_high, jnp.round(height * ratio_high), float(width)),
    )
    fallback_h = jnp.where(in_ratio < ratio_low, jnp.round(width / ratio_low), float(height))
    fallback_top = jnp.floor((height - fallback_h) / 2)
    fallback_left = jnp.floor((width - fallback_w) / 2)

    box_top = jnp.where(any_fits, pick(top), fallback_top)
    box_left = jnp.where(any_fits, pick(left), fallback_left)
    box_h = jnp.where(any_fits, pick(h), fallback_h)
    box_w = jnp.where(any_fits, pick(w), fallback_w)
    return jnp.stack(
        [box_top / height, box_left / width, box_h / height, box_w / width], axis=1
    ).astype(jnp.float32)


def boxes_to_pixels(boxes: ArrayLike, height: int, width: int) -> Array:
    """Normalised ``(top/H, left/W, h/H, w/W)`` boxes back to integer ``(top, left, h, w)``.

    Rounding to the nearest integer undoes the float32 division of :func:`rrc_boxes` exactly
    for any image side below 2²² pixels. Heights and widths are clamped to at least one pixel
    and boxes to the image, so hand-written boxes cannot index outside it.

    Args:
        boxes: ``(N, 4)`` normalised boxes.
        height: image height H.
        width: image width W.

    Returns:
        ``(N, 4)`` int32 ``(top, left, h, w)``.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    top = jnp.clip(jnp.round(boxes[:, 0] * height), 0, height - 1)
    left = jnp.clip(jnp.round(boxes[:, 1] * width), 0, width - 1)
    h = jnp.clip(jnp.round(boxes[:, 2] * height), 1, height - top)
    w = jnp.clip(jnp.round(boxes[:, 3] * width), 1, width - left)
    return jnp.stack([top, left, h, w], axis=1).astype(jnp.int32)


def _interpolation_matrix(start: Array, size: Array, in_size: int, out_size: int) -> Array:
    """``(N, out_size, in_size)`` weights of 1-D bilinear resampling of ``[start, start+size)``.

    ``align_corners=False`` as PyTorch's ``upsample_bilinear2d`` without a scale factor:
    ``src = (dst + 0.5)·size/out − 0.5`` clamped at 0, the lower neighbour ``⌊src⌋``, the upper
    one ``⌊src⌋ + 1`` unless that leaves the crop (then both weights fall on the last pixel).
    """
    size_f = size.astype(jnp.float32)[:, None]
    dst = jnp.arange(out_size, dtype=jnp.float32)[None, :]
    src = jnp.maximum((dst + 0.5) * (size_f / out_size) - 0.5, 0.0)
    lower = jnp.floor(src)
    frac = src - lower
    lower = lower.astype(jnp.int32)
    upper = lower + (lower < size[:, None] - 1).astype(jnp.int32)
    columns = jnp.arange(in_size, dtype=jnp.int32)[None, None, :]
    origin = start[:, None, None]
    weights = jnp.where(columns == origin + lower[..., None], (1.0 - frac)[..., None], 0.0)
    return weights + jnp.where(columns == origin + upper[..., None], frac[..., None], 0.0)


def resized_crop(images: ArrayLike, boxes: ArrayLike, out_height: int, out_width: int) -> Array:
    """Crops each image to its box and resizes it bilinearly to a fixed size.

    torchvision ``F.resized_crop(img, top, left, h, w, [out_height, out_width],
    antialias=False)`` on each image, i.e. ``F.interpolate(crop, size, mode='bilinear',
    align_corners=False)`` of the integer pixel box. Written as two small matrix products (rows,
    then columns) so that the output shape is fixed whatever the box, and the result is
    differentiable with respect to ``images`` (the gradient reaches only the pixels in the box).

    Args:
        images: ``(N, H, W, C)``.
        boxes: ``(N, 4)`` normalised ``(top/H, left/W, h/H, w/W)`` (from :func:`rrc_boxes`).
        out_height: output height (static).
        out_width: output width (static).

    Returns:
        ``(N, out_height, out_width, C)`` in the images' dtype.
    """
    images = jnp.asarray(images)
    check(images.ndim == 4, f"resized_crop needs NHWC images, got shape {images.shape}")
    _check_size("resized_crop out_height", out_height)
    _check_size("resized_crop out_width", out_width)
    n, height, width, _ = images.shape
    boxes = jnp.asarray(boxes)
    check(boxes.shape == (n, 4), f"resized_crop needs boxes of shape ({n}, 4), got {boxes.shape}")
    pixels = boxes_to_pixels(boxes, height, width)
    rows = _interpolation_matrix(pixels[:, 0], pixels[:, 2], height, out_height)
    cols = _interpolation_matrix(pixels[:, 1], pixels[:, 3], width, out_width)
    rows, cols = rows.astype(images.dtype), cols.astype(images.dtype)
    precision = jax.lax.Precision.HIGHEST  # exact weights: no bf16 passes on accelerators
    out = jnp.einsum("noh,nhwc->nowc", rows, images, precision=precision)
    return jnp.einsum("npw,nowc->nopc", cols, out, precision=precision)


def flip(images: ArrayLike, flags: ArrayLike) -> Array:
    """torchvision ``hflip`` (reverse the width axis) of the images whose flag is set.

    Args:
        images: ``(N, H, W, C)``.
        flags: ``(N,)`` booleans.

    Returns:
        The images, flipped where ``flags``.
    """
    images = jnp.asarray(images)
    flags = jnp.asarray(flags, bool)
    check(
        flags.shape == images.shape[:1],
        f"flip needs one flag per image ({images.shape[:1]}), got {flags.shape}",
    )
    return jnp.where(flags[:, None, None, None], images[:, :, ::-1, :], images)


def roll(images: ArrayLike, shift_h: ArrayLike, shift_w: ArrayLike) -> Array:
    """``torch.roll(images, shifts=(shift_h, shift_w), dims=(H, W))``: a cyclic shift.

    Positive shifts move content towards larger indices; what leaves one edge re-enters at
    the other. The shifts may be traced integers (one compiled program for every shift).

    Args:
        images: ``(N, H, W, C)``.
        shift_h: shift along the height.
        shift_w: shift along the width.

    Returns:
        The rolled images.
    """
    images = jnp.asarray(images)
    check(images.ndim == 4, f"roll needs NHWC images, got shape {images.shape}")
    return jnp.roll(images, (shift_h, shift_w), axis=(1, 2))
