"""SRe2L relabel: FKD-style soft labels, stored compactly and replayed exactly, or made online.

SRe2L (Yin, Xing & Shen, NeurIPS 2023) trains students on its recovered images with the
teacher's soft predictions on *augmented* views (``research/sre2l.md`` §4). On ImageNet-1K the
official code (``SRe2L/relabel/generate_soft_label.py`` with FKD's ``utils_fkd.py``) makes them
once, offline, for 300 epochs: each epoch is a seeded random order of the synthetic images cut
into batches of 1024; every image gets a ``RandomResizedCrop`` box (scale (0.08, 1)) and a
horizontal-flip flag; every batch gets one CutMix (a partner permutation, λ ~ Beta(1, 1) and
one box of side ratio √(1−λ) around a uniform centre, clipped) or MixUp (λ ~ Beta(0.8, 0.8));
and the teacher, in eval mode, labels the augmented, mixed batch with raw logits kept in fp16.
Training (``train_FKD.py``) replays exactly those crops, flips and mixes, so the student sees
the very images the logits were computed on. On CIFAR and Tiny-ImageNet the published code
runs the teacher *online* instead, on the student's own augmented batch (§4-§5); that needs
no storage and is :func:`make_labeller` called afresh at every step.

**The map from images to batches** is a pure function of ``(seed, epoch)``
(:func:`batch_map`): the permutation of epoch ``e`` is drawn from ``fold_in(key(seed), e)``,
consecutive chunks of ``batch_size`` are the batches (the last one smaller when the batch size
does not divide the number of images, as a ``DataLoader`` with ``drop_last=False``), and batch
``b`` draws its augmentation from :func:`batch_key` ``(seed, e, b)``. Training rebuilds the map
from the seed instead of reading it (FKD's ``get_img2batch_idx_list``), and online KD with the
same seed draws *the same* batches and augmentations as the store holds.

**Storage** (:func:`write_store`): one ``epoch_NNNN.npz`` per epoch with all its batches
stacked along the image axis, in batch order -- ``boxes`` (N, 4) float32 normalised
``(top/H, left/W, h/H, w/W)`` as FKD stores them, ``flips`` (N,) bool, ``mix_perm`` (N,) int32
(each image's partner within its batch), ``mix_lam`` and ``mix_bbox`` per batch, and
``logits`` (N, C) float16 -- plus ``relabel.json``: fingerprints of the dataset, the teacher
and the synthetic set, the batch size, seed, epochs, augmentation and teacher mode, and the
bytes of every epoch file. Files are written to a temporary name and renamed, so a killed run
loses at most the epoch in progress and resumes with it. FKD writes one ``.tar`` per batch
(14,700 files at ImageNet IPC 50); the soft labels themselves are the same size.

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
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ddjax.data import Dataset
from ddjax.errors import DDJaxError, check
from ddjax.sre2l import crops
from ddjax.synset import SyntheticSet
from ddjax.workdir import write_json

if TYPE_CHECKING:  # recover imports nothing from here; only the type is needed
    from ddjax.sre2l.recover import DataContract

__all__ = [
    "CROPS",
    "MIXES",
    "TEACHER_MODES",
    "AugmentSpec",
    "BatchAugment",
    "BatchLabels",
    "LabelStore",
    "apply_augment",
    "augmented_batch",
    "augmenter",
    "batch_key",
    "batch_map",
    "check_store",
    "check_teacher_fits",
    "dataset_fingerprint",
    "draw_augment",
    "iterate_online",
    "make_labeller",
    "open_store",
    "padding_fill",
    "relabel_config",
    "replay",
    "run_relabel",
    "synset_fingerprint",
    "teacher_fingerprint",
    "teacher_logits",
    "write_store",
]

FORMAT = 1
INDEX_FILE = "relabel.json"
STORE_DIR = "labels"

CROPS = ("rrc", "random_crop", "none")
MIXES = ("cutmix", "mixup", "none")
TEACHER_MODES = ("eval", "train")

Array = jax.Array
Log = Callable[..., None]


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
    """Builds the jitted ``label(variables, images, indices, key) -> (augment, views, logits)``.

    One batch of relabelling: gather ``images[indices]``, :func:`draw_augment` with ``key``,
    :func:`apply_augment`, :func:`teacher_logits`. The same compiled function makes the
    stored labels (:func:`write_store`) and the online ones (``ddjax.sre2l.kd``), so a store
    and an online run with the same seed see identical views and identical fp32 logits.
    Cached per ``(model, spec, mode)``, so a process compiles it once per batch shape.

    Args:
      model: the teacher's module.
      spec: the augmentation.
      mode: the teacher's mode, ``'eval'`` or ``'train'``.

    Returns:
      The jitted function; ``variables`` are the teacher's, ``images`` the whole synthetic set.
    """
    check(
        mode in TEACHER_MODES, f"teacher_mode={mode!r} is not known; valid: {list(TEACHER_MODES)}"
    )

    @jax.jit
    def label(variables, images, indices, key):
        batch = images[indices]
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
    _check_positive("num_images", num_images)
    _check_positive("batch_size", batch_size)
    perm_key, _ = _epoch_keys(seed, epoch)
    perm = np.asarray(_permutation(perm_key, int(num_images)), np.int32)
    return [perm[start : start + batch_size] for start in range(0, num_images, batch_size)]


def batch_key(seed: int, epoch: int, batch: int) -> Array:
    """The key of batch ``batch`` of ``epoch``: its crops, flips and mix are drawn from it."""
    _, augment_key = _epoch_keys(seed, epoch)
    return jax.random.fold_in(augment_key, batch)


def _check_positive(name: str, value: Any) -> None:
    check(
        isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1,
        f"{name}={value!r} must be a positive integer",
    )


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


def synset_fingerprint(synset: SyntheticSet) -> str:
    """A hash of the synthetic images (float32) and labels: a changed pixel changes it."""
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
      augment: the batch's :class:`BatchAugment` (NumPy arrays).
      logits: ``(B, num_classes)`` float16 raw teacher logits on the augmented batch.
    """

    indices: np.ndarray
    augment: BatchAugment
    logits: np.ndarray


@dataclasses.dataclass(frozen=True)
class LabelStore:
    """An opened relabel store (:func:`open_store`): its directory and ``relabel.json``.

    Attributes:
      path: the store directory.
      index: the parsed ``relabel.json``.
    """

    path: Path
    index: dict

    @property
    def batch_size(self) -> int:
        return int(self.index["batch_size"])

    @property
    def seed(self) -> int:
        return int(self.index["seed"])

    @property
    def epochs(self) -> int:
        """Epochs the store was asked for (see :attr:`completed_epochs` for those on disk)."""
        return int(self.index["epochs"])

    @property
    def num_images(self) -> int:
        return int(self.index["num_images"])

    @property
    def num_classes(self) -> int:
        return int(self.index["num_classes"])

    @property
    def spec(self) -> AugmentSpec:
        return AugmentSpec.from_json(self.index["augment"])

    @property
    def teacher_mode(self) -> str:
        return str(self.index["teacher_mode"])

    @property
    def storage_bytes(self) -> int:
        """Bytes of the epoch files (the soft labels and their augmentation parameters)."""
        return int(self.index["storage_bytes"])

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
    try:
        index = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DDJaxError(f"{file} cannot be read ({e}); the relabel store is corrupt") from None
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

    The indices are rebuilt with :func:`batch_map` from the store's seed (FKD's
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


@functools.lru_cache(maxsize=16)
def augmenter(spec: AugmentSpec):
    """The jitted ``augment(images, indices, augment) -> views`` of one spec (built once).

    ``views = apply_augment(images[indices], augment, spec)``: what FKD's training loader gives
    for a stored batch. The spec is closed over, so each spec compiles once per batch shape.
    """
    return jax.jit(lambda images, indices, augment: apply_augment(images[indices], augment, spec))


def augmented_batch(images: Any, batch: BatchLabels, spec: AugmentSpec) -> Array:
    """Re-applies a stored batch's augmentation to the synthetic images (FKD's training view).

    Args:
      images: ``(N, H, W, C)`` the whole synthetic set (the one the store was made from).
      batch: one entry of :func:`replay`.
      spec: the store's augmentation (``store.spec``).

    Returns:
      ``(B, H, W, C)``: exactly the images the stored logits were computed on.
    """
    return augmenter(spec)(jnp.asarray(images), jnp.asarray(batch.indices), batch.augment)


def _index(
    synset: SyntheticSet,
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
        "num_images": int(synset.images.shape[0]),
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

    For every epoch without a file: the batches of :func:`batch_map`, each labelled by
    :func:`make_labeller` with :func:`batch_key`, written as one ``epoch_NNNN.npz`` (temporary
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
      teacher_mode: ``'eval'`` (FKD) or ``'train'`` (see :func:`teacher_logits`).
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
    _check_positive("epochs", epochs)
    _check_positive("batch_size", batch_size)
    check(isinstance(seed, int | np.integer), f"seed={seed!r} must be an integer")
    check(
        teacher_mode in TEACHER_MODES,
        f"teacher_mode={teacher_mode!r} is not known; valid: {list(TEACHER_MODES)}",
    )
    images = np.asarray(synset.images, np.float32)
    check(
        images.shape[1:] == dataset.image_shape,
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
    for leftover in path.glob("*.tmp"):  # a killed write; its epoch is redone below
        leftover.unlink()
    done = set(_epochs_on_disk(path))
    # An epoch renamed into place just before a kill may be missing from the index.
    index["epoch_bytes"] = {
        str(e): os.path.getsize(path / f"epoch_{e:04d}.npz") for e in sorted(done)
    }
    index["storage_bytes"] = sum(index["epoch_bytes"].values())
    write_json(index_file, index)

    label = make_labeller(teacher.model, spec, teacher_mode)
    variables = jax.tree.map(jnp.asarray, dict(teacher.variables))
    device_images = jnp.asarray(images)
    start = time.time()
    todo = [e for e in range(epochs) if e not in done]
    bar = tqdm(todo, desc="relabel", disable=None if progress else True, leave=False)
    for epoch in bar:
        epoch_start = time.time()
        arrays = _label_epoch(label, variables, device_images, batch_size, seed, epoch)
        file = path / f"epoch_{epoch:04d}.npz"
        tmp = path / f"epoch_{epoch:04d}.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, file)
        size = os.path.getsize(file)
        index["epoch_bytes"][str(epoch)] = size
        index["storage_bytes"] = sum(index["epoch_bytes"].values())
        write_json(index_file, index)
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


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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


def _label_epoch(
    label, variables: Any, images: Array, batch_size: int, seed: int, epoch: int
) -> dict[str, np.ndarray]:
    """All batches of one epoch, labelled and stacked in batch order."""
    parts = []
    for b, indices in enumerate(batch_map(images.shape[0], batch_size, seed, epoch)):
        augment, _, logits = label(variables, images, indices, batch_key(seed, epoch, b))
        parts.append((augment, logits.astype(jnp.float16)))
    parts = jax.device_get(parts)
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


def iterate_online(
    label, variables: Any, images: Array, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[Array, Array]]:
    """Online KD's batches of ``epoch``: ``(views, fp32 logits)`` from the same keys as a store."""
    for b, indices in enumerate(batch_map(images.shape[0], batch_size, seed, epoch)):
        _, views, logits = label(variables, images, indices, batch_key(seed, epoch, b))
        yield views, logits


# --------------------------------------------------------------------------------------------
# The stage: config + work directory
# --------------------------------------------------------------------------------------------


def relabel_config(
    dataset: str,
    recipe: str,
    *,
    labels: str = "stored",
    models: tuple[str, ...] = ("ResNet18BN",),
    model_overrides: Mapping[str, Any] | None = None,
    normalisation: str = "",
    seed: int = 42,
    **recipe_changes: Any,
) -> ml_collections.ConfigDict:
    """The fields of a ``ddjax relabel`` config (``configs/relabel/<dataset>.py``).

    Args:
      dataset: ``config.dataset.name``; empty: no images are loaded and the data contract
        (shape, classes, mean/std) is the teacher's (``teacher.json``), which is enough for
        stored labels but not for evaluating students (``config.evaluate`` must be False).
      recipe: a ``ddjax.sre2l.kd`` recipe name; all its fields are copied into
        ``config.recipe`` so the resolved config shows every hyper-parameter.
      labels: ``'stored'`` (FKD) or ``'online'`` (teacher at every step; nothing stored).
      models: student architectures evaluated after relabelling.
      model_overrides: student fields for every architecture in ``models`` (e.g.
        ``{'conv_init': 'torchvision'}``); keys set here can be overridden on the command line.
      normalisation: ``config.dataset.normalisation`` (a ``ddjax.data.NORMALISATION`` key or
        ``'computed'``; empty: the source's own). Must be the teacher's.
      seed: the batch-map and augmentation seed (FKD ``--fkd-seed 42``).
      **recipe_changes: recipe fields that replace the preset's (e.g. ``epochs=100``).
    """
    from ddjax.sre2l import kd  # kd builds on this module

    config = ml_collections.ConfigDict()
    config.dataset = ml_collections.ConfigDict(
        {
            "name": dataset,  # empty: the teacher's data contract, no images (stored labels only)
            "data_dir": "",  # empty: the default locations
            "zca": False,  # SRe2L works in mean/std-normalised space
            "normalisation": normalisation,
        }
    )
    config.synset = ""  # the recovered synthetic set (.npz from ddjax recover)
    config.teacher = ""  # the teacher directory (from ddjax squeeze or import_torch_teacher)
    config.labels = labels  # stored (FKD files) | online (teacher at every student step)
    config.seed = seed  # image->batch map and augmentation draws
    recipe_fields = dataclasses.asdict(kd.get_recipe(recipe, **recipe_changes))
    config.recipe = ml_collections.ConfigDict(recipe_fields)  # ddjax.sre2l.kd.Recipe fields
    config.evaluate = True  # train students on the labels right away
    config.eval = ml_collections.ConfigDict(
        {
            "models": models,  # student architectures
            "num_models": 5,  # K students per architecture
            "seed": 0,  # student initialisation
            "model_overrides": ml_collections.ConfigDict(dict(model_overrides or {})),
            "pool_mode": "auto",  # auto | vmap | loop
        }
    )
    return config


def run_relabel(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """``ddjax relabel``: soft labels for a recovered set, then KD students trained on them.

    Reads the synthetic set (``config.synset``, :func:`ddjax.synset.load_synset`) and the teacher
    (``config.teacher``, :func:`ddjax.sre2l.teacher.load_teacher`), checks both against the
    dataset, and writes into ``workdir``: ``config.json``, ``metrics.jsonl``, the store
    ``labels/`` (when ``config.labels == 'stored'``) and ``results.json`` with the storage size
    and, with ``config.evaluate``, one :class:`ddjax.evaluate.EvalResult` per student
    architecture (``ddjax.sre2l.kd.evaluate_kd``). Re-running resumes: finished epochs of
    labels and finished architectures are not recomputed.

    Args:
      config: from ``configs/relabel/<dataset>.py`` (:func:`relabel_config`).
      workdir: the run's directory.
      progress: progress bars and one printed line per result.

    Returns:
      The contents of ``results.json``.

    Raises:
      DDJaxError: bad config values, missing files, or a teacher/synset of other data.
    """
    from ddjax import data as data_lib
    from ddjax import models as models_lib
    from ddjax.sre2l import kd
    from ddjax.sre2l import teacher as teacher_lib
    from ddjax.sre2l.recover import DataContract
    from ddjax.synset import load_synset
    from ddjax.workdir import Workdir

    check(
        config.labels in ("stored", "online"),
        f"config.labels={config.labels!r} is not known; valid: ['stored', 'online']",
    )
    recipe = kd.recipe_from_config(config.recipe)
    check(bool(config.synset), "config.synset is empty; pass --config.synset=PATH/synset.npz")
    check(bool(config.teacher), "config.teacher is empty; pass --config.teacher=TEACHER_DIR")
    check(isinstance(config.seed, int), f"config.seed={config.seed!r} must be an integer")
    check(
        config.labels == "stored" or config.evaluate,
        "config.labels='online' stores nothing, so config.evaluate=False leaves nothing to do; "
        "set --config.evaluate=True or --config.labels=stored",
    )
    teacher = teacher_lib.load_teacher(config.teacher)
    if config.dataset.name:
        dataset = data_lib.load_from_config(config.dataset)
        teacher_lib.check_teacher(teacher, dataset)
    else:
        check(
            not config.evaluate,
            "config.evaluate=True needs the test images: set config.dataset.name (or pass "
            "--config.evaluate=False to only write the labels)",
        )
        dataset = DataContract.of_teacher(teacher.meta)
    synset = load_synset(config.synset)
    check(
        synset.images.shape[1:] == dataset.image_shape
        and synset.num_classes == dataset.num_classes,
        f"synthetic set {config.synset} has images {synset.images.shape[1:]} and "
        f"{synset.num_classes} classes; dataset {dataset.name!r} has {dataset.image_shape} and "
        f"{dataset.num_classes}",
    )
    model_overrides = config.eval.model_overrides.to_dict()
    if config.evaluate:
        check(len(config.eval.models) >= 1, "config.eval.models is empty; e.g. ResNet18BN")
        check(
            config.eval.num_models >= 1,
            f"config.eval.num_models={config.eval.num_models} must be at least 1",
        )
        for name in config.eval.models:
            models_lib.get_model(name, dataset.num_classes, dataset.image_shape, **model_overrides)
    work = Workdir(workdir, config, "relabel")
    results = work.results()

    store = None
    if config.labels == "stored":
        summary = write_store(
            work.file(STORE_DIR),
            synset,
            teacher,
            dataset,
            spec=recipe.augment_spec(dataset),
            epochs=recipe.epochs,
            batch_size=recipe.batch_size,
            seed=config.seed,
            teacher_mode=recipe.teacher_mode,
            progress=progress,
            log=work.log,
        )
        store = open_store(work.file(STORE_DIR))
        if progress:
            print(
                f"relabel: {summary['completed_epochs']} epochs of soft labels in {store.path} "
                f"({summary['storage_bytes'] / 2**20:.2f} MiB)"
            )
    else:
        summary = {"path": None, "epochs": recipe.epochs, "storage_bytes": 0, "index_bytes": 0}
    results["labels"] = {"mode": config.labels, **summary}
    work.save_results(results)

    if config.evaluate:
        results["eval"] = kd.evaluate_into(
            work,
            synset,
            dataset,
            teacher,
            recipe=recipe,
            store=store,
            models=config.eval.models,
            num_models=config.eval.num_models,
            seed=config.eval.seed,
            augment_seed=config.seed,
            model_overrides=model_overrides,
            pool_mode=config.eval.pool_mode,
            progress=progress,
        )
    return results
