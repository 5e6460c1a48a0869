"""The augmented views of SRe2L's relabel and KD: crops, flips, CutMix/MixUp, seeded batches.

SRe2L (Yin, Xing & Shen, NeurIPS 2023) trains students on the teacher's soft predictions on
*augmented* views of the recovered images (``research/sre2l.md`` §4), made as FKD does
(``SRe2L/relabel/generate_soft_label.py`` with FKD's ``utils_fkd.py``): each epoch is a seeded
random order of the synthetic images cut into batches; every image gets a ``RandomResizedCrop``
box (scale (0.08, 1)) and a horizontal-flip flag; every batch gets one CutMix (a partner
permutation, λ ~ Beta(1, 1) and one box of side ratio √(1−λ) around a uniform centre, clipped)
or MixUp (λ ~ Beta(0.8, 0.8)); and the teacher labels the augmented, mixed batch with raw
logits. This module draws and applies those views (:func:`draw_augment`,
:func:`apply_augment`) and labels them (:func:`make_labeller`); the stored labels live in
:mod:`ddjax.sre2l.label_store`, the students in :mod:`ddjax.sre2l.kd`.

**The map from images to batches** is a pure function of ``(seed, epoch)``
(:func:`batch_map`): the permutation of epoch ``e`` is drawn from ``fold_in(key(seed), e)``,
consecutive chunks of ``batch_size`` are the batches (the last one smaller when the batch size
does not divide the number of images, as a ``DataLoader`` with ``drop_last=False``), and batch
``b`` draws its augmentation from :func:`batch_key` ``(seed, e, b)``. Training rebuilds the map
from the seed instead of reading it (FKD's ``get_img2batch_idx_list``), and online KD with the
same seed draws *the same* batches and augmentations as a store holds.

**Deliberate differences from FKD**, each a consequence of working on arrays in JAX:

* random numbers come from JAX's PRNG, and epoch ``e``'s order from ``(seed, e)`` alone rather
  than from one ``torch.Generator`` consumed epoch after epoch: same distributions, other
  values, and any epoch can be made or resumed on its own;
* crops resample the float synthetic images in the dataset's normalised space (FKD decodes
  uint8 JPEGs and resamples PIL images before normalising). The crop is never larger than the
  image, so PIL's bilinear filter is the plain bilinear upsampling of
  :func:`ddjax.sre2l.crops.resized_crop`, and resampling commutes with the per-channel
  normalisation, so the only difference is the uint8 rounding;
* ``'random_crop'`` (CIFAR's ``RandomCrop(32, padding=4)``) pads with a black pixel expressed
  in the dataset's space (−mean/std; 0 with ZCA), as torchvision pads before normalising.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax import sharding
from ddjax.data import Dataset
from ddjax.errors import DDJaxError, check
from ddjax.sre2l import crops
from ddjax.sre2l.contract import DataContract
from ddjax.synfolder import FolderImages

__all__ = [
    "CROPS",
    "MIXES",
    "TEACHER_MODES",
    "VIEW_FIELDS",
    "AugmentSpec",
    "BatchAugment",
    "apply_augment",
    "augmenter",
    "batch_key",
    "batch_map",
    "check_teacher_fits",
    "draw_augment",
    "gather",
    "iterate_online",
    "make_labeller",
    "padding_fill",
    "teacher_logits",
]

#: Per-image crops: torchvision's ``RandomResizedCrop``, ``RandomCrop(size, padding)``, none.
CROPS = ("rrc", "random_crop", "none")
#: Per-batch mixes (FKD's ``--cutmix`` / ``--mixup``), or none.
MIXES = ("cutmix", "mixup", "none")
#: The teacher's BatchNorm mode while labelling (see :func:`teacher_logits`).
TEACHER_MODES = ("eval", "train")

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Augmentation: what is drawn per batch, and how it is applied
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """How training views are made from synthetic images (per image crop + flip, per batch mix).

    The output of every crop has the image's own size (FKD's ``--input-size 224`` on 224-px
    images, ``RandomResizedCrop(64)`` on Tiny-ImageNet, ``RandomCrop(32)`` on CIFAR).

    Attributes:
      crop: ``'rrc'`` (torchvision ``RandomResizedCrop``, scale ``(min_scale, max_scale)``,
        ratio (3/4, 4/3)), ``'random_crop'`` (``RandomCrop(size, padding)``: a shift by
        ``U{-padding..padding}`` per axis, the uncovered border filled with ``fill``) or
        ``'none'``.
      min_scale: lower bound of the crop's area fraction (``'rrc'``).
      max_scale: upper bound of the crop's area fraction (``'rrc'``).
      padding: pixels of padding on every side (``'random_crop'``).
      flip: ``RandomHorizontalFlip(p=0.5)`` after the crop.
      mix: ``'cutmix'``, ``'mixup'`` or ``'none'``, once per batch after crop and flip.
      cutmix_alpha: CutMix's λ ~ Beta(α, α) (FKD's ``--cutmix 1.0``).
      mixup_alpha: MixUp's λ ~ Beta(α, α) (FKD's ``--mixup 0.8``; CIFAR's ``alpha=0.8``).
      fill: per-channel value of padded pixels in the dataset's space (:func:`padding_fill`);
        empty means 0.
    """

    crop: str = "rrc"
    min_scale: float = 0.08
    max_scale: float = 1.0
    padding: int = 4
    flip: bool = True
    mix: str = "cutmix"
    cutmix_alpha: float = 1.0
    mixup_alpha: float = 0.8
    fill: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check(self.crop in CROPS, f"augment crop={self.crop!r} is not known; valid: {list(CROPS)}")
        check(self.mix in MIXES, f"augment mix={self.mix!r} is not known; valid: {list(MIXES)}")
        check(
            _is_number(self.min_scale)
            and _is_number(self.max_scale)
            and 0 < self.min_scale <= self.max_scale <= 1,
            f"augment min_scale={self.min_scale!r}, max_scale={self.max_scale!r}: need "
            "0 < min_scale <= max_scale <= 1",
        )
        check(
            isinstance(self.padding, int)
            and not isinstance(self.padding, bool)
            and self.padding >= 0,
            f"augment padding={self.padding!r} must be a non-negative integer",
        )
        check(isinstance(self.flip, bool), f"augment flip={self.flip!r} must be True or False")
        for field in ("cutmix_alpha", "mixup_alpha"):
            value = getattr(self, field)
            check(_is_number(value) and value > 0, f"augment {field}={value!r} must be > 0")
        check(
            isinstance(self.fill, tuple) and all(_is_number(v) for v in self.fill),
            f"augment fill={self.fill!r} must be a tuple of per-channel numbers",
        )

    def to_json(self) -> dict:
        """A JSON-able dict (``fill`` as a list)."""
        return {**dataclasses.asdict(self), "fill": list(self.fill)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AugmentSpec:
        """The inverse of :meth:`to_json`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        check(not unknown, f"augment settings {unknown} are not known; valid: {sorted(fields)}")
        return cls(**{**data, "fill": tuple(float(v) for v in data.get("fill", ()))})


#: The fields of :class:`AugmentSpec` that a KD recipe sets (``fill`` comes from the dataset).
VIEW_FIELDS = tuple(f.name for f in dataclasses.fields(AugmentSpec) if f.name != "fill")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)


def padding_fill(dataset: Dataset | DataContract) -> tuple[float, ...]:
    """A black pixel in ``dataset``'s space: torchvision pads with 0 before normalising.

    Args:
      dataset: the dataset (or the teacher's ``DataContract``) whose normalisation the
        synthetic images share.

    Returns:
      ``(-mean_c / std_c for each channel)``; zeros for a ZCA-whitened dataset, where a black
      border is not a constant (ddjax then pads with 0, the whitened mean).
    """
    if getattr(dataset, "zca", None) is not None:
        return tuple(0.0 for _ in dataset.mean)
    return tuple(float(-m / s) for m, s in zip(dataset.mean, dataset.std, strict=True))


class BatchAugment(NamedTuple):
    """The random choices of one batch (arrays; a pytree, so it passes through ``jit``).

    Attributes:
      boxes: ``(B, 4)`` float32 crop boxes ``(top/H, left/W, h/H, w/W)``; for
        ``'random_crop'`` the window may start outside the image (top in ``[-p/H, p/H]``).
      flips: ``(B,)`` bool, flip after cropping.
      mix_perm: ``(B,)`` int32, the partner of each image within the batch.
      mix_lam: ``()`` float32 λ (1 when there is no mix).
      mix_bbox: ``(4,)`` int32 CutMix box ``(top, left, bottom, right)`` in pixels, rows
        ``[top, bottom)`` and columns ``[left, right)`` (zeros without CutMix). FKD's
        ``(bbx1, bby1, bbx2, bby2)``: its ``bbx`` indexes dim 2 of NCHW, the height.
    """

    boxes: Array
    flips: Array
    mix_perm: Array
    mix_lam: Array
    mix_bbox: Array


def draw_augment(key: Array, spec: AugmentSpec, num: int, height: int, width: int) -> BatchAugment:
    """Draws one batch's crops, flips and mix parameters (jittable; ints static).

    * ``'rrc'``: :func:`ddjax.sre2l.crops.rrc_boxes` (torchvision ``get_params``).
    * ``'random_crop'``: torchvision ``RandomCrop.get_params`` on the padded image,
      ``i, j ~ U{0..2p}``, stored as the window ``((i-p)/H, (j-p)/W, 1, 1)``.
    * flip: ``torch.rand(1) < 0.5`` per image.
    * CutMix (FKD ``cutmix``/``rand_bbox``): ``perm = randperm(B)``, ``λ ~ Beta(α, α)``, cut
      sides ``int(H·√(1−λ))`` and ``int(W·√(1−λ))``, centre ``(U{0..H−1}, U{0..W−1})``, corners
      ``centre ∓ side // 2`` clipped to the image. MixUp: ``perm``, ``λ ~ Beta(α, α)``.

    Key use (stable: stores depend on it): ``crop_key, draw_key = split(key)``; ``'rrc'``
    boxes come from ``crop_key``; everything else from one flat draw of ``4B + 130`` random
    32-bit words from ``draw_key`` -- in order: flips (B), the partner permutation as the
    ``argsort`` of B words (a uniformly random permutation up to ties of 32-bit words), the two
    ``'random_crop'`` offsets (2B), the CutMix centre (2) and 128 numbers for λ
    (:func:`_symmetric_beta`). Uniforms are ``(word >> 8)·2⁻²⁴``; integers in ``[0, k)`` are
    ``floor(u·k)``. One flat draw because every separate PRNG call adds about half a second
    of XLA:CPU compile time (as in ``ddjax.augment``).

    Args:
      key: the batch's key (:func:`batch_key`).
      spec: the augmentation.
      num: batch size B.
      height: image height H.
      width: image width W.

    Returns:
      A :class:`BatchAugment`.
    """
    crop_key, draw_key = jax.random.split(key)
    words = jax.random.bits(draw_key, (4 * num + 2 + 2 * _JOHNK_TRIES,), jnp.uint32)
    u = (words >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)  # uniform in [0, 1)
    u_flip, perm_words = u[:num], words[num : 2 * num]
    u_offsets = u[2 * num : 4 * num].reshape(2, num)
    u_centre, u_lam = u[4 * num : 4 * num + 2], u[4 * num + 2 :]
    if spec.crop == "rrc":
        boxes = crops.rrc_boxes(crop_key, num, height, width, (spec.min_scale, spec.max_scale))
    elif spec.crop == "random_crop":
        offsets = jnp.floor(u_offsets * (2 * spec.padding + 1)) - spec.padding
        ones = jnp.ones((num,))
        boxes = jnp.stack([offsets[0] / height, offsets[1] / width, ones, ones], axis=1)
        boxes = boxes.astype(jnp.float32)
    else:
        boxes = jnp.tile(jnp.array([[0.0, 0.0, 1.0, 1.0]], jnp.float32), (num, 1))
    flips = u_flip < 0.5 if spec.flip else jnp.zeros((num,), bool)

    bbox = jnp.zeros((4,), jnp.int32)
    if spec.mix == "none":
        return BatchAugment(boxes, flips, jnp.arange(num, dtype=jnp.int32), jnp.float32(1), bbox)
    perm = jnp.argsort(perm_words).astype(jnp.int32)
    alpha = spec.cutmix_alpha if spec.mix == "cutmix" else spec.mixup_alpha
    lam = _symmetric_beta(u_lam, alpha, crop_key)
    if spec.mix == "cutmix":
        cut = jnp.sqrt(1.0 - lam)
        cut_h = jnp.floor(height * cut).astype(jnp.int32)  # int() of a non-negative float
        cut_w = jnp.floor(width * cut).astype(jnp.int32)
        centre_h = jnp.floor(u_centre[0] * height).astype(jnp.int32)
        centre_w = jnp.floor(u_centre[1] * width).astype(jnp.int32)
        top = jnp.clip(centre_h - cut_h // 2, 0, height)
        left = jnp.clip(centre_w - cut_w // 2, 0, width)
        bottom = jnp.clip(centre_h + cut_h // 2, 0, height)
        right = jnp.clip(centre_w + cut_w // 2, 0, width)
        bbox = jnp.stack([top, left, bottom, right]).astype(jnp.int32)
    return BatchAugment(boxes, flips, perm, lam, bbox)


_JOHNK_TRIES = 64


def _symmetric_beta(u: Array, alpha: float, key: Array) -> Array:
    """λ ~ Beta(α, α) from 128 uniforms ``u``, drawn so that it compiles quickly on XLA:CPU.

    ``jax.random.beta`` samples two gammas by rejection inside a ``while_loop``, which takes
    seconds to compile on CPU. The published α are cheaper: Beta(1, 1) (CutMix) is U(0, 1),
    i.e. ``u[0]``, and for α < 1 (MixUp's 0.8) Jöhnk's method is exact: with ``x = a^(1/α)``,
    ``y = b^(1/α)`` for the pairs ``(a, b)`` of ``u``, the first pair with ``x + y ≤ 1`` gives
    ``x / (x + y)``. Each pair is accepted with probability Γ(1+α)²/Γ(1+2α) (0.61 at α = 0.8),
    so all 64 fail with probability below 1e-25, when 0.5 is returned. Other α use
    ``jax.random.beta(fold_in(key, 1))``.
    """
    if alpha == 1.0:
        return u[0]
    if alpha > 1.0:
        return jax.random.beta(jax.random.fold_in(key, 1), alpha, alpha).astype(jnp.float32)
    pairs = jnp.maximum(u, 1e-12).reshape(2, -1)
    x, y = pairs[0] ** (1.0 / alpha), pairs[1] ** (1.0 / alpha)
    accepted = x + y <= 1.0
    first = jnp.argmax(accepted)
    lam = x[first] / (x[first] + y[first])
    return jnp.where(jnp.any(accepted), lam, 0.5).astype(jnp.float32)


def _shift_crop(images: Array, boxes: Array, padding: int, fill: Sequence[float]) -> Array:
    """``RandomCrop(size, padding)``: the window at the boxes' (possibly negative) offsets."""
    n, height, width, channels = images.shape
    fill_value = jnp.asarray(fill if fill else (0.0,) * channels, images.dtype)
    check(
        fill_value.shape == (channels,),
        f"augment fill has {fill_value.shape[0]} values, the images have {channels} channels",
    )
    padded = jnp.broadcast_to(fill_value, (n, height + 2 * padding, width + 2 * padding, channels))
    padded = padded.at[:, padding : padding + height, padding : padding + width].set(images)
    top = jnp.round(boxes[:, 0] * height).astype(jnp.int32) + padding
    left = jnp.round(boxes[:, 1] * width).astype(jnp.int32) + padding
    window = lambda image, row, col: jax.lax.dynamic_slice(  # noqa: E731
        image, (row, col, 0), (height, width, channels)
    )
    return jax.vmap(window)(padded, top, left)


def apply_augment(images: Array, augment: BatchAugment, spec: AugmentSpec) -> Array:
    """Applies one batch's crops, flips and mix to its images (FKD's order; jittable).

    Crop (resampled to the image size) → flip → mix, where CutMix pastes the partner's pixels
    inside the box (``images[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]``) and MixUp
    blends ``λ·x + (1−λ)·x[perm]``. No label mixing: the target is the teacher's output on the
    mixed image. Differentiable with respect to ``images``.

    Args:
      images: ``(B, H, W, C)`` synthetic images of the batch, in batch order.
      augment: the batch's :class:`BatchAugment` (drawn or replayed).
      spec: the augmentation.

    Returns:
      ``(B, H, W, C)`` augmented images.
    """
    _, height, width, _ = images.shape
    if spec.crop == "rrc":
        images = crops.resized_crop(images, augment.boxes, height, width)
    elif spec.crop == "random_crop":
        images = _shift_crop(images, augment.boxes, spec.padding, spec.fill)
    if spec.flip:
        images = crops.flip(images, augment.flips)
    partner = images[augment.mix_perm]
    if spec.mix == "cutmix":
        top, left, bottom, right = (augment.mix_bbox[i] for i in range(4))
        rows = jnp.arange(height)[:, None]
        cols = jnp.arange(width)[None, :]
        inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
        images = jnp.where(inside[None, :, :, None], partner, images)
    elif spec.mix == "mixup":
        images = augment.mix_lam * images + (1.0 - augment.mix_lam) * partner
    return images


def teacher_logits(
    model: nn.Module, variables: Mapping[str, Any], images: Array, mode: str
) -> Array:
    """The teacher's raw logits (temperature is applied only at training time, SRe2L issue #22).

    Args:
      model: the teacher's module.
      variables: its ``params`` and ``batch_stats``.
      images: the augmented batch.
      mode: ``'eval'`` (running statistics: FKD, Tiny-ImageNet) or ``'train'`` (BatchNorm
        normalises with the statistics of this batch: SRe2L's ``relabel_cifar.py`` never calls
        ``model_teacher.eval()``; its running statistics, updated there, are never read).

    Returns:
      ``(B, num_classes)`` float32 logits. Running statistics are never changed.
    """
    return model.apply(dict(variables), images, train=mode == "train")


@functools.lru_cache(maxsize=8)
def make_labeller(model: nn.Module, spec: AugmentSpec, mode: str):
    """Builds the jitted ``label(variables, batch, key) -> (augment, views, logits)``.

    One batch of relabelling (``batch = gather(images, indices)``): :func:`draw_augment`
    with ``key``, :func:`apply_augment`, :func:`teacher_logits`. The same compiled function
    makes the stored labels (:func:`ddjax.sre2l.label_store.write_store`) and the online ones
    (``ddjax.sre2l.kd``), so a store and an online run with the same seed see identical views
    and identical fp32 logits.
    Cached per ``(model, spec, mode)``, so a process compiles it once per batch shape.

    Args:
      model: the teacher's module.
      spec: the augmentation.
      mode: the teacher's mode, ``'eval'`` or ``'train'``.

    Returns:
      The jitted function; ``variables`` are the teacher's, ``batch`` the batch's synthetic
      images (:func:`gather`).
    """
    check(
        mode in TEACHER_MODES, f"teacher_mode={mode!r} is not known; valid: {list(TEACHER_MODES)}"
    )

    @jax.jit
    def label(variables, batch, key):
        num, height, width, _ = batch.shape
        augment = draw_augment(key, spec, num, height, width)
        views = apply_augment(batch, augment, spec)
        return augment, views, teacher_logits(model, variables, views, mode)

    return label


# --------------------------------------------------------------------------------------------
# Batches and keys: pure functions of (seed, epoch)
# --------------------------------------------------------------------------------------------


def _epoch_keys(seed: int, epoch: int) -> tuple[Array, Array]:
    perm_key, augment_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), epoch))
    return perm_key, augment_key


@functools.partial(jax.jit, static_argnums=1)
def _permutation(key: Array, num: int) -> Array:
    return jax.random.permutation(key, num)


def batch_map(num_images: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The synthetic-image indices of every batch of ``epoch``: a pure function of its arguments.

    A permutation of ``range(num_images)`` drawn from ``fold_in(key(seed), epoch)``, cut into
    consecutive batches of ``batch_size`` (the last one holds the remainder). FKD's sampler
    (``RandomSampler`` + ``BatchSampler(drop_last=False)``, ``get_img2batch_idx_list``).

    Args:
      num_images: N, the size of the synthetic set.
      batch_size: B.
      seed: the relabel seed (FKD's ``--fkd-seed``, 42).
      epoch: 0-based epoch.

    Returns:
      ``ceil(N / B)`` int32 arrays; together a permutation of ``range(N)``.
    """
    check_positive("num_images", num_images)
    check_positive("batch_size", batch_size)
    perm_key, _ = _epoch_keys(seed, epoch)
    perm = np.asarray(_permutation(perm_key, int(num_images)), np.int32)
    return [perm[start : start + batch_size] for start in range(0, num_images, batch_size)]


def batch_key(seed: int, epoch: int, batch: int) -> Array:
    """The key of batch ``batch`` of ``epoch``: its crops, flips and mix are drawn from it."""
    _, augment_key = _epoch_keys(seed, epoch)
    return jax.random.fold_in(augment_key, batch)


def check_positive(name: str, value: Any) -> None:
    check(
        isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1,
        f"{name}={value!r} must be a positive integer",
    )


# --------------------------------------------------------------------------------------------
# Views of a whole epoch: replayed from stored parameters, or drawn and labelled online
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def augmenter(spec: AugmentSpec):
    """The jitted ``augment(batch, augment) -> views`` of one spec (built once).

    ``views = apply_augment(batch, augment, spec)`` with ``batch = gather(images, indices)``:
    what FKD's training loader gives for a stored batch. The spec is closed over, so each spec
    compiles once per batch shape.
    """
    return jax.jit(lambda batch, augment: apply_augment(batch, augment, spec))


@jax.jit
def _take(images: Array, indices: Array) -> Array:
    return images[indices]


def gather(images: Any, indices: Any, where: jax.sharding.Sharding | None = None) -> Array:
    """The synthetic images ``indices`` of a relabel or KD batch, as one device array.

    ``images`` is an in-memory set's ``(N, H, W, C)`` array (a device array is gathered where
    it lives) or a synthetic folder's lazy images (:class:`ddjax.synfolder.FolderImages`),
    of which only the batch's files are decoded -- by each process only the rows its devices
    hold when ``where`` shards the batch over several hosts. ``where``: the batch's placement
    (``None``: where the gather happens, the default device for a folder).
    """
    indices = np.asarray(indices, np.int32)
    if isinstance(images, FolderImages):
        return images.folder.take_placed(indices, where)
    batch = _take(images, indices)
    return batch if where is None else sharding.put(batch, where)


def check_teacher_fits(teacher: Any, dataset: Dataset | DataContract) -> None:
    """Checks that the teacher takes ``dataset``'s images and gives one logit per class.

    Shapes only (``jax.eval_shape``; nothing runs). ``ddjax.sre2l.teacher.check_teacher``
    compares the full data contract recorded with a teacher on disk.

    Raises:
      DDJaxError: one line naming the mismatch.
    """
    images = jax.ShapeDtypeStruct((1, *dataset.image_shape), jnp.float32)
    try:
        out = jax.eval_shape(
            lambda variables, x: teacher.model.apply(variables, x), dict(teacher.variables), images
        )
    except Exception as e:  # a mismatched teacher fails deep inside Flax; report it in one line
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DDJaxError(
            f"the teacher does not run on {dataset.name!r} images of shape "
            f"{dataset.image_shape}: {message}"
        ) from None
    check(
        out.shape == (1, dataset.num_classes),
        f"the teacher has {out.shape[-1]} outputs, dataset {dataset.name!r} has "
        f"{dataset.num_classes} classes",
    )


def iterate_online(
    label, variables: Any, images: Any, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[Array, Array]]:
    """Online KD's batches of ``epoch``: ``(views, fp32 logits)`` from the same keys as a store.

    ``images``: an in-memory set's array or a folder's lazy images (:func:`gather`).
    """
    for b, indices in enumerate(batch_map(images.shape[0], batch_size, seed, epoch)):
        batch = gather(images, indices)
        _, views, logits = label(variables, batch, batch_key(seed, epoch, b))
        yield views, logits
