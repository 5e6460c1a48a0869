"""Differentiable siamese augmentation (DSA) and the simple crop+flip augmentation.

Every function here is a pure function of an explicit PRNG key and a batch of NHWC images: it
can be jitted, vmapped over a leading axis of keys (a pool of models, each with its own
augmentation), and differentiated with respect to the image values. This is what lets
trajectory matching backpropagate through augmented inner steps.

DSA reproduces Zhao & Bilen 2021, "Dataset Condensation with Differentiable Siamese
Augmentation" (ICML), as implemented in MTT's ``utils.py`` (``DiffAugment`` with
``ParamDiffAug``, identical in TESLA, DATM and SelMatch):

* mode ``'S'``: each call draws *one* group uniformly from the strategy (e.g.
  ``"color_crop_cutout_flip_scale_rotate"``) and applies it to the whole batch;
* inside the group, every sample gets its own random parameters (MTT calls ``DiffAugment``
  with ``seed=-1``, so there is no siamese sharing between samples);
* ``scale`` and ``rotate`` resample with ``F.affine_grid``/``F.grid_sample`` semantics
  (bilinear, zero padding, ``align_corners=True``), reimplemented here with gathers.

PyTorch works in NCHW; here images are NHWC. MTT's "x" axis of ``crop``/``cutout`` is dim 2
(height) and its "y" axis is dim 3 (width); its ``flip`` reverses dim 3 (width). The
``affine_grid`` x coordinate indexes width and y indexes height. All of this is translated
axis by axis below.

Randomness and key-splitting conventions (stable: tests and callers rely on them):

* every op makes exactly one PRNG call, ``u = uniform(key, (P * N,)).reshape(P, N)``: one row
  of per-sample ``U[0, 1)`` numbers (``torch.rand(N)``) per parameter. Rows: ``brightness``,
  ``saturation``, ``contrast``, ``flip``, ``rotate``: P = 1; ``crop`` and ``cutout``:
  (height, width); ``scale``: (sx for the width, sy for the height). One flat draw per op
  because the threefry kernel dominates XLA compile time on CPU, and one 1-D draw compiled
  about 3x faster than separate or 2-D draws (jax 0.10);
* integers in ``[low, high)`` (``torch.randint(low, high)``) are ``low + floor(u * (high -
  low))``: the same uniform distribution over the integers;
* group ``color`` uses ``split(key, 3)`` for brightness, saturation, contrast in that order;
  single-op groups pass ``key`` to their op unchanged (see :func:`apply_group`);
* :func:`dsa`: ``key_choice, key_apply = split(key)``; the group index is
  ``floor(uniform(key_choice, (1,))[0] * len(groups))`` and the group gets ``key_apply``;
* :func:`crop_flip`: one draw of three rows (height offset, width offset, flip);
* :func:`combined`: ``key_distilled, key_rest = split(key)``; distilled image ``i`` gets
  ``split(key_distilled, num_distilled)[i]``; the rest get ``crop_flip(key_rest, ...)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddjax.errors import DDJaxError, check

__all__ = [
    "DEFAULT_PARAMS",
    "DEFAULT_STRATEGY",
    "GROUPS",
    "DSAParams",
    "apply_group",
    "brightness",
    "combined",
    "contrast",
    "crop",
    "crop_flip",
    "cutout",
    "dsa",
    "flip",
    "make_augment",
    "parse_strategy",
    "rotate",
    "saturation",
    "scale",
]

Array = jax.Array
AugmentFn = Callable[[Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class DSAParams:
    """Magnitudes of the DSA operations: the defaults of MTT's ``ParamDiffAug``.

    Frozen (hashable), so it can be closed over or passed as a static argument to ``jax.jit``.
    ``ParamDiffAug.ratio_noise`` is omitted: no DSA group uses it.

    Attributes:
        prob_flip: probability that a sample is flipped horizontally.
        ratio_scale: scale factors are drawn from ``U[1/ratio_scale, ratio_scale)``.
        ratio_rotate: rotation angles are drawn from ``U[-ratio_rotate, ratio_rotate)`` degrees.
        ratio_crop_pad: maximum translation as a fraction of the image side.
        ratio_cutout: side of the cut-out square as a fraction of the image side.
        brightness: additive brightness offsets are ``(u - 0.5) * brightness``.
        saturation: saturation factors are ``u * saturation``.
        contrast: contrast factors are ``u + contrast``.
    """

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            check(
                isinstance(value, int | float) and math.isfinite(value),
                f"DSAParams.{field.name}={value!r}: expected a finite number",
            )
        check(
            0.0 <= self.prob_flip <= 1.0,
            f"DSAParams.prob_flip={self.prob_flip}: expected a probability in [0, 1]",
        )
        check(
            self.ratio_scale > 0.0,
            f"DSAParams.ratio_scale={self.ratio_scale}: expected a positive ratio (MTT: 1.2)",
        )
        for name in ("ratio_crop_pad", "ratio_cutout"):
            check(
                getattr(self, name) >= 0.0,
                f"DSAParams.{name}={getattr(self, name)}: expected a non-negative fraction",
            )


DEFAULT_PARAMS = DSAParams()
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


# The ops are jitted with their configuration static so that eager calls (notebooks, tests,
# Python drivers) compile once per shape; inside a caller's jit/vmap/grad the inner jit is inlined.
_jit_with_params = functools.partial(jax.jit, static_argnames=("params",))


def _draw(key: Array, num_rows: int, num: int) -> Array:
    """``[num_rows, num]`` U[0, 1) numbers (float32) from a single flat PRNG call.

    Each row is one per-sample parameter, like one ``torch.rand(N)`` in MTT. A flat draw
    reshaped is used rather than a 2-D shape or several keys: see the module docstring.
    """
    return jax.random.uniform(key, (num_rows * num,), dtype=jnp.float32).reshape(num_rows, num)


def _to_int(u: Array, low: int, high: int) -> Array:
    """Maps U[0, 1) numbers to integers uniform in ``[low, high)`` (``torch.randint``)."""
    # The clip guards against u * (high - low) rounding up to high - low in float32.
    return jnp.clip(low + jnp.floor(u * (high - low)).astype(jnp.int32), low, high - 1)


def _per_sample(values: Array, images: Array) -> Array:
    """Reshapes per-sample values ``[N]`` to broadcast against NHWC images."""
    return values.astype(images.dtype).reshape((-1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------
# Deterministic transforms with explicit per-sample parameters.


def _adjust_brightness(images: Array, offsets: Array) -> Array:
    """Adds ``offsets[n]`` to every pixel of sample ``n``."""
    return images + _per_sample(offsets, images)


def _adjust_saturation(images: Array, factors: Array) -> Array:
    """Scales each pixel's deviation from its mean over channels by ``factors[n]``.

    With one channel the deviation is exactly zero, so this is the identity (DSA's saturation
    does nothing on grayscale data such as Fashion-MNIST).
    """
    mean = jnp.mean(images, axis=3, keepdims=True)
    return (images - mean) * _per_sample(factors, images) + mean


def _adjust_contrast(images: Array, factors: Array) -> Array:
    """Scales each sample's deviation from its mean over (H, W, C) by ``factors[n]``."""
    mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
    return (images - mean) * _per_sample(factors, images) + mean


def _flip(images: Array, do_flip: Array) -> Array:
    """Reverses the width axis of the samples where ``do_flip[n]`` is true (PyTorch dim 3)."""
    return jnp.where(do_flip.reshape((-1, 1, 1, 1)), images[:, :, ::-1, :], images)


@jax.jit
def _translate(images: Array, shift_h: Array, shift_w: Array) -> Array:
    """Translates each sample by integer offsets with zero fill.

    Output pixel ``(i, j)`` of sample ``n`` is input pixel ``(i + shift_h[n], j + shift_w[n])``,
    or zero where that lies outside the image. This reproduces MTT's ``rand_crop`` literally: it
    gathers from a 1-pixel zero-padded image at indices clamped to the padded range, so every
    out-of-range read lands on the zero border (whatever the size of the shift).

    Args:
        images: ``[N, H, W, C]``.
        shift_h: ``[N]`` integer offsets along the height (MTT's ``translation_x``).
        shift_w: ``[N]`` integer offsets along the width (MTT's ``translation_y``).

    Returns:
        The translated images, ``[N, H, W, C]``.
    """
    height, width = images.shape[1], images.shape[2]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))

    def one(image: Array, dh: Array, dw: Array) -> Array:
        rows = jnp.clip(jnp.arange(height) + dh + 1, 0, height + 1)
        cols = jnp.clip(jnp.arange(width) + dw + 1, 0, width + 1)
        return image[rows[:, None], cols[None, :]]

    return jax.vmap(one)(padded, shift_h.astype(jnp.int32), shift_w.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("size_h", "size_w"))
def _cutout(images: Array, offset_h: Array, offset_w: Array, size_h: int, size_w: int) -> Array:
    """Zeroes one ``size_h x size_w`` rectangle per sample by a mask multiply.

    As in MTT's ``rand_cutout``: rows ``clip(offset_h - size_h // 2 + k, 0, H - 1)`` for
    ``k < size_h`` and the analogous columns are cut, so a square near the border is clipped to
    the image. A multiplicative mask keeps the op differentiable w.r.t. the image (zero gradient
    inside the hole).

    Args:
        images: ``[N, H, W, C]``.
        offset_h: ``[N]`` integer centre rows (MTT's ``offset_x``).
        offset_w: ``[N]`` integer centre columns (MTT's ``offset_y``).
        size_h: static side of the hole along the height.
        size_w: static side of the hole along the width.

    Returns:
        The images with the holes set to zero, ``[N, H, W, C]``.
    """
    height, width = images.shape[1], images.shape[2]

    def hit(offsets: Array, size: int, extent: int) -> Array:
        # [N, extent] booleans: which rows (or columns) the clamped index set touches. The
        # explicit enumeration over k keeps MTT's clamping exact even in degenerate sizes.
        cut = jnp.clip(offsets[:, None] - size // 2 + jnp.arange(size), 0, extent - 1)
        return jnp.any(cut[:, :, None] == jnp.arange(extent)[None, None, :], axis=1)

    rows = hit(offset_h.astype(jnp.int32), size_h, height)
    cols = hit(offset_w.astype(jnp.int32), size_w, width)
    mask = 1.0 - (rows[:, :, None] & cols[:, None, :]).astype(images.dtype)
    return images * mask[:, :, :, None]


def _bilinear_sample(image: Array, x: Array, y: Array) -> Array:
    """Samples one ``[H, W, C]`` image at fractional pixel coordinates, zero outside.

    The four neighbours that fall outside the image contribute zero, as in PyTorch's
    ``grid_sample(mode='bilinear', padding_mode='zeros')``. The gathers are linear in the image,
    so the result is differentiable w.r.t. the image values.

    Args:
        image: ``[H, W, C]``.
        x: ``[Ho, Wo]`` column coordinates in pixels.
        y: ``[Ho, Wo]`` row coordinates in pixels.

    Returns:
        ``[Ho, Wo, C]``.
    """
    height, width = image.shape[0], image.shape[1]
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    weight_x1 = x - x0
    weight_y1 = y - y0
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)
    result = jnp.zeros(x.shape + image.shape[2:], image.dtype)
    for row, weight_y in ((y0, 1.0 - weight_y1), (y0 + 1, weight_y1)):
        for col, weight_x in ((x0, 1.0 - weight_x1), (x0 + 1, weight_x1)):
            inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
            weight = jnp.where(inside, weight_x * weight_y, 0.0).astype(image.dtype)
            value = image[jnp.clip(row, 0, height - 1), jnp.clip(col, 0, width - 1)]
            result = result + value * weight[:, :, None]
    return result


@jax.jit
def _affine(images: Array, theta: Array) -> Array:
    """Warps each sample by a 2x3 affine matrix, like ``affine_grid`` + ``grid_sample``.

    Reproduces PyTorch's ``F.affine_grid(theta, size, align_corners=True)`` followed by
    ``F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=True)``:
    output pixel ``(i, j)`` has normalised coordinates ``x = linspace(-1, 1, W)[j]`` (width) and
    ``y = linspace(-1, 1, H)[i]`` (height); ``theta`` maps them to the normalised input point
    ``(x', y') = theta @ (x, y, 1)``, which is read at pixel ``((x' + 1) / 2 * (W - 1),
    (y' + 1) / 2 * (H - 1))`` (with ``align_corners=True``, -1 is the centre of the first pixel
    and +1 the centre of the last, so the identity matrix reproduces the image).

    Args:
        images: ``[N, H, W, C]``.
        theta: ``[N, 2, 3]`` matrices mapping output to input coordinates.

    Returns:
        The warped images, ``[N, H, W, C]``.
    """
    height, width = images.shape[1], images.shape[2]
    # Coordinates are computed in float32 even for low-precision images.
    base_x = jnp.linspace(-1.0, 1.0, width, dtype=jnp.float32)[None, :]
    base_y = jnp.linspace(-1.0, 1.0, height, dtype=jnp.float32)[:, None]

    def one(image: Array, matrix: Array) -> Array:
        matrix = matrix.astype(jnp.float32)
        grid_x = matrix[0, 0] * base_x + matrix[0, 1] * base_y + matrix[0, 2]
        grid_y = matrix[1, 0] * base_x + matrix[1, 1] * base_y + matrix[1, 2]
        pixel_x = (grid_x + 1.0) / 2.0 * (width - 1)
        pixel_y = (grid_y + 1.0) / 2.0 * (height - 1)
        return _bilinear_sample(image, pixel_x, pixel_y)

    return jax.vmap(one)(images, theta)


def _scale_theta(key: Array, num: int, params: DSAParams) -> Array:
    """MTT's ``rand_scale`` matrices ``[[sx, 0, 0], [0, sy, 0]]``, ``[num, 2, 3]``.

    ``sx = u * (r - 1/r) + 1/r`` with ``u ~ U[0, 1)``, i.e. ``U[1/r, r)``; ``sx`` scales the
    width (x) coordinate and ``sy`` the height (y) coordinate, drawn independently.
    """
    ratio = params.ratio_scale
    factors = _draw(key, 2, num) * (ratio - 1.0 / ratio) + 1.0 / ratio
    zeros = jnp.zeros((num,), jnp.float32)
    return jnp.stack(
        [
            jnp.stack([factors[0], zeros, zeros], axis=-1),
            jnp.stack([zeros, factors[1], zeros], axis=-1),
        ],
        axis=1,
    )


def _rotate_theta(key: Array, num: int, params: DSAParams) -> Array:
    """MTT's ``rand_rotate`` matrices ``[[cos a, -sin a, 0], [sin a, cos a, 0]]``, ``[num, 2, 3]``.

    ``a = (u - 0.5) * 2 * ratio_rotate / 180 * pi``, i.e. uniform in +-``ratio_rotate`` degrees.
    Since ``theta`` maps output to input coordinates and the y axis points down the rows, a
    positive angle turns the picture anticlockwise as displayed (90 degrees equals
    ``jnp.rot90(image, k=1)`` on a square image), as MTT's comment says.
    """
    angle = (_draw(key, 1, num)[0] - 0.5) * 2.0 * params.ratio_rotate / 180.0 * math.pi
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    zeros = jnp.zeros((num,), jnp.float32)
    return jnp.stack(
        [jnp.stack([cos, -sin, zeros], axis=-1), jnp.stack([sin, cos, zeros], axis=-1)], axis=1
    )


# ---------------------------------------------------------------------------------------------
# The DSA operations: per-sample random parameters drawn from an explicit key.


@_jit_with_params
def brightness(key: Array, images: Array, params: DSAParams = DEFAULT_PARAMS) -> Array:
    """DSA brightness: ``x + (u - 0.5) * params.brightness`` with one ``u ~ U[0, 1)`` per sample.

    Zhao & Bilen 2021 (DSA), MTT ``utils.rand_brightness``.

    Args:
        key: PRNG key.
        images: ``[N, H, W, C]`` images.
        params: augmentation magnitudes.

    Returns:
        The augmented images, same shape and dtype.
    """
    u = _draw(key, 1, images.shape[0])[0]
    return _adjust_brightness(images, (u - 0.5) * params.brightness)


@_jit_with_params
def saturation(key: Array, images: Array, params: DSAParams = DEFAULT_PARAMS) -> Array:
    """DSA saturation: ``(x - mean_c x) * (u * params.saturation) + mean_c x`` per sample.

    The mean is over channels only, so this is the identity for one channel. Zhao & Bilen
    2021 (DSA), MTT ``utils.rand_saturation``.

    Args:
        key: PRNG key.
        images: ``[N, H, W, C]`` images.
        params: augmentation magnitudes.

    Returns:
        The augmented images, same shape and dtype.
    """
    return _adjust_saturation(images, _draw(key, 1, images.shape[0])[0] * params.saturation)


@_jit_with_params
def contrast(key: Array, images: Array, params: DSAParams = DEFAULT_PARAMS) -> Array:
    """DSA contrast: ``(x - mean) * (u + params.contrast) + mean``, mean over (H, W, C).

    Each sample keeps its own mean. Zhao & Bilen 2021 (DSA), MTT ``utils.rand_contrast``.

    Args:
        key: PRNG key.
        images: ``[N, H, W, C]`` images.
        params: augmentation magnitudes.

    Returns:
        The augmented images, same shape and dtype.
    """
    return _adjust_contrast(images, _draw(key, 1, images.shape[0])[0] + params.contrast)


@_jit_with_params
def crop(key: Array, images: Array, params: DSAParams = DEFAULT_PARAMS) -> Array:
    """DSA crop: a random integer translation with zero fill, per sample.

    ``shift = int(H * ratio_crop_pad + 0.5)`` (4 at 28/32 px), offsets drawn like
    ``torch.randint(-shift, shift + 1)``, i.e. in ``[-shift, shift]`` inclusive, independently
    along the height and along the width (whose shift is computed from W). Zhao & Bilen 2021
    (DSA), MTT ``utils.rand_crop``; see :func:`_translate` for the exact zero fill.

    Args:
        key: PRNG key; one draw of rows (height, width).
        images: ``[N, H, W, C]`` images.
        params: augmentation magnitudes.

    Returns:
        The augmented images, same shape and dtype.
    """
    num, height, width = images.shape[:3]
    shift_h = int(height * params.ratio_crop_pad + 0.5)
    shift_w = int(width * params.ratio_crop_pad + 0.5)
    u = _draw(key, 2, num)
    offsets_h = _to_int(u[0], -shift_h, shift_h + 1)
    offsets_w = _to_int(u[1], -shift_w, shift_w + 1)
    return _translate(images, offsets_h, offsets_w)


@_jit_with_params
def cutout(key: Array, images: Array, params: DSAParams = DEFAULT_PARAMS) -> Array:
    """DSA cutout: zero one square per sample (side ``int(H * ratio_cutout + 0.5)``).

    Centres are drawn like MTT: ``randint(0, H + (1 - side % 2))`` rows and the same with W
    for columns; the hole is clipped at the border. Zhao & Bilen 2021 (DSA), MTT
    ``utils.rand_cutout``; see :func:`_cutout`.

    Args:
        key: PRNG key; one draw of rows (height, width).
        images: ``[N, H, W, C]`` images.
        params: augmentation magnitudes.

    Returns:
        The augmented images, same shape and dtype.
    """
    num, height, width = images.shape[:3]
    size_h = int(height * params.ratio_cutout + 0.5)
    size_w = int(width * params.ratio_cutout + 0.5)
    u = _draw(key, 2, num)
    offsets_h = _to_int(u[0], 0, height + (1 - size_h % 2))
    offsets_w = _to_int(u[1], 0, width + (1 - size_w % 2))
    return _cutout(images, offsets_h, offsets_w, size_h, size_w)


@_jit_with_params
def flip(key: Array, images: Array, params: DSAParams = DEFAULT_PARAMS) -> Array:
    """DSA flip: reverse the width axis of each sample where ``u < params.prob_flip``.

    Zhao & Bilen 2021 (DSA), MTT ``utils.rand_flip`` (``x.flip(3)`` in NCHW is the width).

    Args:
        key: PRNG key.
        images: ``[N, H, W, C]`` images.
        params: augmentation magnitudes.

    Returns:
        The augmented images, same shape and dtype.
    """
    return _flip(images, _draw(key, 1, images.shape[0])[0] < params.prob_flip)


@_jit_with_params
def scale(key: Array, images: Array, params: DSAParams = DEFAULT_PARAMS) -> Array:
    """DSA scale: bilinear resampling by ``[[sx, 0, 0], [0, sy, 0]]``, ``sx, sy ~ U[1/r, r)``.

    Factors above one sample a wider area of the input, i.e. shrink the picture (with zero
    padding); factors below one enlarge it. Zhao & Bilen 2021 (DSA), MTT ``utils.rand_scale``;
    see :func:`_scale_theta` and :func:`_affine`.

    Args:
        key: PRNG key; one draw of rows (sx, sy).
        images: ``[N, H, W, C]`` images.
        params: augmentation magnitudes.

    Returns:
        The augmented images, same shape and dtype.
    """
    return _affine(images, _scale_theta(key, images.shape[0], params))


@_jit_with_params
def rotate(key: Array, images: Array, params: DSAParams = DEFAULT_PARAMS) -> Array:
    """DSA rotate: bilinear rotation by a per-sample angle in +-``ratio_rotate`` degrees.

    Zhao & Bilen 2021 (DSA), MTT ``utils.rand_rotate``; see :func:`_rotate_theta` and
    :func:`_affine`.

    Args:
        key: PRNG key.
        images: ``[N, H, W, C]`` images.
        params: augmentation magnitudes.

    Returns:
        The augmented images, same shape and dtype.
    """
    return _affine(images, _rotate_theta(key, images.shape[0], params))


GROUPS: dict[str, tuple[Callable[[Array, Array, DSAParams], Array], ...]] = {
    "color": (brightness, saturation, contrast),
    "crop": (crop,),
    "cutout": (cutout,),
    "flip": (flip,),
    "scale": (scale,),
    "rotate": (rotate,),
}


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Splits a DSA strategy string such as ``"color_crop_flip"`` into validated group names.

    As in MTT's ``DiffAugment``, ``''``, ``'none'`` and ``'None'`` mean no augmentation, and
    repeated names are kept (a repeated group is drawn proportionally more often in mode 'S').

    Args:
        strategy: group names joined by underscores.

    Returns:
        The group names in order; empty for no augmentation.

    Raises:
        DDJaxError: if a name is not one of :data:`GROUPS`.
    """
    check(isinstance(strategy, str), f"DSA strategy={strategy!r}: expected a string")
    strategy = strategy.strip()
    if strategy in ("", "none", "None"):
        return ()
    groups = tuple(strategy.split("_"))
    for group in groups:
        if group not in GROUPS:
            raise DDJaxError(
                f"DSA strategy={strategy!r}: unknown group {group!r}; valid groups are "
                f"{', '.join(GROUPS)} joined by '_' (or 'none')"
            )
    return groups


def apply_group(key: Array, images: Array, group: str, params: DSAParams = DEFAULT_PARAMS) -> Array:
    """Applies one DSA group: its ops in sequence, each with per-sample parameters.

    A single-op group passes ``key`` to its op unchanged; ``color`` splits it into three keys
    for brightness, saturation and contrast (in MTT's order).

    Args:
        key: PRNG key.
        images: ``[N, H, W, C]`` images.
        group: a key of :data:`GROUPS`.
        params: augmentation magnitudes.

    Returns:
        The augmented images, same shape and dtype.

    Raises:
        DDJaxError: if ``group`` is unknown.
    """
    check(group in GROUPS, f"DSA group={group!r}: expected one of {', '.join(GROUPS)}")
    ops = GROUPS[group]
    keys = [key] if len(ops) == 1 else list(jax.random.split(key, len(ops)))
    for op, op_key in zip(ops, keys, strict=True):
        images = op(op_key, images, params)
    return images


def dsa(
    key: Array,
    images: Array,
    strategy: str = DEFAULT_STRATEGY,
    params: DSAParams = DEFAULT_PARAMS,
) -> Array:
    """Differentiable siamese augmentation in MTT's mode 'S' (Zhao & Bilen 2021).

    One group is drawn uniformly from ``strategy`` per call and applied to the whole batch,
    with per-sample parameters inside it (MTT ``utils.DiffAugment`` with ``seed=-1``). The
    choice is a ``lax.switch`` on a traced index, so the function compiles once for all groups.
    Under ``vmap`` over keys the index is batched and XLA evaluates every group and selects,
    costing roughly ``len(groups)`` times one group's work.

    ``strategy`` and ``params`` are Python values: close over them (or see
    :func:`make_augment`) rather than passing them as traced arguments.

    Args:
        key: PRNG key, split into ``key_choice, key_apply``.
        images: ``[N, H, W, C]`` images.
        strategy: group names joined by ``'_'``; ``''`` or ``'none'`` returns ``images``.
        params: augmentation magnitudes.

    Returns:
        The augmented images, same shape and dtype.

    Raises:
        DDJaxError: if the strategy names an unknown group.
    """
    groups = parse_strategy(strategy)
    if not groups:
        return images
    return _dsa_switch(key, images, groups, params)


def _choose_group(key_choice: Array, num_groups: int) -> Array:
    """The index of the group that mode 'S' applies: uniform in ``[0, num_groups)``."""
    return _to_int(_draw(key_choice, 1, 1)[0, 0], 0, num_groups)


@functools.partial(jax.jit, static_argnames=("groups", "params"))
def _dsa_switch(key: Array, images: Array, groups: tuple[str, ...], params: DSAParams) -> Array:
    """The mode-'S' draw of :func:`dsa` for validated ``groups``.

    Jitted (with the configuration static) because an eager ``lax.switch`` over freshly built
    branch closures would be retraced and recompiled on every call from a Python loop; inside
    a caller's ``jit``/``vmap``/``grad`` the inner ``jit`` is simply inlined.
    """
    key_choice, key_apply = jax.random.split(key)
    index = _choose_group(key_choice, len(groups))
    branches = [(lambda k, x, g=group: apply_group(k, x, g, params)) for group in groups]
    return jax.lax.switch(index, branches, key_apply, images)


@functools.partial(jax.jit, static_argnames=("padding",))
def crop_flip(key: Array, images: Array, padding: int = 4) -> Array:
    """The simple augmentation: ``RandomCrop(size, padding, fill=0)`` + ``RandomHorizontalFlip``.

    Per sample, as torchvision applies it inside a dataset's ``__getitem__`` (SelMatch's
    ``'simple'`` augmentation and the real part of its ``'combined'``). Cropping a window at
    ``randint(0, 2 * padding + 1)`` from a zero-padded image equals a translation by an offset
    in ``[-padding, padding]`` with zero fill; the flip (probability 0.5) comes after it.

    Args:
        key: PRNG key; one draw of rows (height offset, width offset, flip).
        images: ``[N, H, W, C]`` images.
        padding: static zero padding on every side, in pixels.

    Returns:
        The augmented images, same shape and dtype.

    Raises:
        DDJaxError: if ``padding`` is negative.
    """
    check(
        isinstance(padding, numbers.Integral) and padding >= 0,
        f"crop_flip padding={padding!r}: expected a non-negative integer",
    )
    u = _draw(key, 3, images.shape[0])
    offsets_h = _to_int(u[0], -padding, padding + 1)
    offsets_w = _to_int(u[1], -padding, padding + 1)
    return _flip(_translate(images, offsets_h, offsets_w), u[2] < 0.5)


def _identity(key: Array, images: Array) -> Array:
    """No augmentation (the key is ignored)."""
    del key
    return images


def make_augment(
    name: str, strategy: str = DEFAULT_STRATEGY, params: DSAParams = DEFAULT_PARAMS
) -> AugmentFn:
    """Returns the ``(key, images) -> images`` augmentation that training calls on every batch.

    The configuration is validated here, once, and closed over, so the returned function is
    jittable and vmappable as is.

    Args:
        name: ``'dsa'`` (:func:`dsa` with ``strategy`` and ``params``), ``'crop_flip'``
            (:func:`crop_flip` with padding 4) or ``'none'``.
        strategy: DSA groups joined by ``'_'``; used by ``'dsa'`` only.
        params: DSA magnitudes; used by ``'dsa'`` only.

    Returns:
        A pure function of a PRNG key and an ``[N, H, W, C]`` batch.

    Raises:
        DDJaxError: if ``name`` or ``strategy`` is not valid.
    """
    if name == "dsa":
        parse_strategy(strategy)
        return lambda key, images: dsa(key, images, strategy, params)
    if name == "crop_flip":
        return crop_flip
    if name == "none":
        return _identity
    raise DDJaxError(f"augmentation={name!r}: expected one of 'dsa', 'crop_flip', 'none'")


def combined(
    key: Array,
    images: Array,
    num_distilled: int,
    strategy: str = DEFAULT_STRATEGY,
    params: DSAParams = DEFAULT_PARAMS,
) -> Array:
    """SelMatch's combined augmentation: DSA on the distilled images, crop+flip on the rest.

    Lee & Chung 2024 (SelMatch), ``utils.evaluate_synset`` with ``aug='combined'``: the first
    ``num_distilled`` images of the synthetic set are the distilled ones and get DSA; the
    remaining (selected real) images get :func:`crop_flip`. SelMatch augments inside the
    dataset's ``__getitem__``, so each distilled image draws its *own* DSA group: reproduced by
    vmapping :func:`dsa` over single images with separate keys (which evaluates every group for
    each image, see :func:`dsa`).

    The split is by position in ``images``, so apply this to the whole synthetic set once per
    epoch and shuffle afterwards: every sample is then augmented once per epoch, as with
    SelMatch's data loader.

    Args:
        key: PRNG key, split into ``key_distilled, key_rest``; distilled image ``i`` uses
            ``split(key_distilled, num_distilled)[i]`` and the rest use
            ``crop_flip(key_rest, images[num_distilled:])``.
        images: ``[N, H, W, C]`` images, distilled ones first.
        num_distilled: static number of leading distilled images, ``0 <= num_distilled <= N``.
        strategy: DSA groups joined by ``'_'``.
        params: DSA magnitudes.

    Returns:
        The augmented images, same shape and dtype.

    Raises:
        DDJaxError: if ``num_distilled`` is out of range or the strategy is invalid.
    """
    num = images.shape[0]
    check(
        isinstance(num_distilled, numbers.Integral) and 0 <= num_distilled <= num,
        f"combined num_distilled={num_distilled!r}: expected an integer in [0, {num}]",
    )
    parse_strategy(strategy)
    num_distilled = int(num_distilled)
    if num == 0:
        return images
    key_distilled, key_rest = jax.random.split(key)
    parts = []
    if num_distilled > 0:
        keys = jax.random.split(key_distilled, num_distilled)
        augment_one = lambda k, image: dsa(k, image[None], strategy, params)[0]
        parts.append(jax.vmap(augment_one)(keys, images[:num_distilled]))
    if num_distilled < num:
        parts.append(crop_flip(key_rest, images[num_distilled:]))
    return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
