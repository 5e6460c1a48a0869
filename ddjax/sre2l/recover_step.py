r"""SRe2L *recover*, the pure part: the BN-matching objective, its step, one batch's run.

Yin, Xing & Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale From A
New Perspective" (NeurIPS 2023), recover stage; reproduced from the official code
(``SRe2L/recover/data_synthesis.py`` and ``*small_dataset/recover_{cifar,tiny}.py``; brief
``research/sre2l.md`` §3 and §10). For a batch of target classes ``y``::

    x* = argmin_x CE(f(A(x)), y)
                  + r_bn · Σ_l m_l (‖σ²_l(A(x)) − running_var_l‖₂ + ‖μ_l(A(x)) − running_mean_l‖₂)

* ``f`` is the squeezed teacher in eval mode (BatchNorm normalises with its running
  statistics); ``μ_l``, ``σ²_l`` are the mean and *biased* variance over (N, H, W) of the
  *input* of BatchNorm layer ``l``, of the whole batch; the norms are plain (not squared)
  Euclidean norms over channels; ``m_1 = first_bn_multiplier`` (10) for the first BatchNorm
  layer in module order (the stem's), ``m_l = 1`` otherwise. CE is the batch mean.
* ``A`` is the "multi-crop" augmentation, drawn once per iteration and shared by the whole
  batch: one ``RandomResizedCrop`` box (output = the image size), one horizontal-flip decision,
  then ``torch.roll`` by offsets drawn uniformly from the ``jitter`` range (inclusive). CIFAR
  drops the crop and the flip and only rolls.
* ``x`` starts as N(0, 1) noise in the normalised space; Adam(β = (0.5, 0.9), ε = 1e-8) with
  the learning rate set before every iteration ``t = 0..T−1`` to ``0.5·(1 + cos(πt/T))·lr``;
  after each update every channel is clipped to the normalised image of [0, 1],
  ``[(0 − m_c)/s_c, (1 − m_c)/s_c]``. The last iterate is kept.
* Batches: the official single-GPU order — for each ``ipc`` index, the classes in order in
  batches of ``batch_size`` distinct classes, one image each — every batch optimised
  independently with a fresh Adam. ``batching='class_wise'`` instead fills each batch with
  images of one class (LPLD's class-wise batches, brief §7.6).
* Output: SRe2L saves ``uint8(floor(255·pixels))`` as JPEG at PIL's quality 75 and relabels
  the decoded JPEGs; ``jpeg_quality=75`` reproduces that round trip, 0 keeps the float images.

Where ddjax differs, deliberately: random numbers come from JAX's PRNG (same distributions,
other values than torch's); the augmentation is expressed at a fixed output shape so that one
compiled step serves every iteration (:mod:`ddjax.sre2l.crops`; bilinear without antialias, as
torchvision ≤ 0.16 did); the L2 norm has a zero (not NaN) gradient at exactly zero; with
``class_wise`` batches the targets remain the teacher's global running statistics (LPLD's
class-conditional statistics need a teacher that stores them); the verifier network, TV and
L2 priors of the reference (display-only or weight 0 in the published runs) are omitted. When
the batch is sharded over devices (``NamedSharding`` on the batch axis) the statistics are still
those of the whole batch: under ``jit`` on global arrays a mean over the batch axis is global.

This module is pure JAX plus two host helpers (the batch plan and the JPEG round trip); the
stage that runs it in a work directory is :mod:`ddjax.sre2l.recover`.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ddjax import distributed, guard, loop, models, sharding, xla
from ddjax.errors import DDJaxError, check
from ddjax.sre2l import crops

__all__ = [
    "BATCHINGS",
    "RecoverBatch",
    "RecoverSettings",
    "RecoverState",
    "batch_sharding_for",
    "bn_layer_names",
    "cosine_lr",
    "init_state",
    "jpeg_round_trip",
    "make_recover_step",
    "multi_crop",
    "plan_batches",
    "recover_batch",
    "recover_loss",
    "state_from_host",
    "state_to_host",
]

Array = jax.Array

#: ``distinct_classes``: SRe2L's single-GPU order; ``class_wise``: one class per batch (LPLD).
BATCHINGS = ("distinct_classes", "class_wise")

# Adam as in every SRe2L recover script: optim.Adam([inputs], betas=[0.5, 0.9], eps=1e-8).
ADAM_B1, ADAM_B2, ADAM_EPS = 0.5, 0.9, 1e-8


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


def _l2_norm(vector: Array) -> Array:
    """``torch.norm(v, 2)``, with a zero gradient (not NaN) where ``v`` is exactly zero."""
    squared = jnp.sum(jnp.square(vector))
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _bn_layers(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple]:
    """``(path, {'mean', 'var'})`` of every BatchNorm layer, in the tree's insertion order.

    The ``bn_inputs`` collection is filled as the layers run, so its insertion order is the
    forward order, the same as PyTorch's ``model.modules()`` for these networks (the stem's
    BatchNorm first). ``jax.tree`` functions would sort the keys instead.
    """
    for name, node in tree.items():
        if isinstance(node, Mapping) and "mean" in node and "var" in node:
            yield (*prefix, name), node
        elif isinstance(node, Mapping):
            yield from _bn_layers(node, (*prefix, name))


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
    for part in path:
        tree = tree[part]
    return tree


def _check_teacher_variables(variables: Mapping[str, Any]) -> None:
    check(
        isinstance(variables, Mapping) and "params" in variables,
        "teacher variables must be a dict with 'params' and 'batch_stats'",
    )
    check(
        bool(jax.tree.leaves(variables.get("batch_stats", {}))),
        "the teacher has no BatchNorm layers (no 'batch_stats'): SRe2L's recover matches "
        "BatchNorm running statistics; squeeze a BN model such as ResNet18BN or ConvNetBN",
    )


def recover_loss(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array,
    labels: Array,
    *,
    r_bn: float | Array,
    first_bn_multiplier: float | Array = 10.0,
) -> tuple[Array, dict[str, Array]]:
    """SRe2L's recover objective on an (already augmented) batch; pure and differentiable.

    ``loss = CE + r_bn · Σ_l m_l (‖σ²_l − running_var_l‖₂ + ‖μ_l − running_mean_l‖₂)`` with
    ``m = (first_bn_multiplier, 1, 1, …)`` in module order (brief §3.1). The teacher runs in
    eval mode (``train=False``: its BatchNorm layers normalise with their running statistics);
    ``μ_l``, ``σ²_l`` are the mean and biased variance over (N, H, W) of each BatchNorm layer's
    input, recorded by :class:`ddjax.models.BatchNorm` in the ``bn_inputs`` collection (the
    reference's forward hooks on ``input[0]``). Only ``params`` and ``batch_stats`` of
    ``variables`` are used, so variables converted from a PyTorch ``state_dict``
    (:func:`ddjax.models.from_torch_state_dict`) work as they are.

    Args:
        model: the teacher (a ddjax model with BatchNorm layers).
        variables: ``{'params': ..., 'batch_stats': ...}``.
        images: ``(N, H, W, C)`` in the teacher's normalised input space.
        labels: ``(N,)`` int target classes.
        r_bn: weight of the BatchNorm term.
        first_bn_multiplier: extra weight of the first BatchNorm layer (the stem's).

    Returns:
        ``(loss, parts)``; ``parts['ce']`` is the mean cross-entropy, ``parts['bn']`` the
        weighted BatchNorm sum *before* ``r_bn``, ``parts['bn_layers']`` the ``(L,)``
        unweighted per-layer terms (mean + variance norms) in module order
        (:func:`bn_layer_names`), ``parts['bn_mean']`` / ``parts['bn_var']`` their two halves.

    Raises:
        DDJaxError: the teacher has no BatchNorm layers, or its ``params``, ``batch_stats``
            and ``images`` are not all one float dtype (the leaf and both dtypes are named).
    """
    _check_teacher_variables(variables)
    models.check_float_dtypes(
        "recover_loss",
        {"images": images, "params": variables["params"], "batch_stats": variables["batch_stats"]},
    )
    teacher = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    logits, state = model.apply(teacher, images, train=False, mutable=["bn_inputs"])
    layers = list(_bn_layers(state.get("bn_inputs", {})))
    check(bool(layers), f"{type(model).__name__} recorded no BatchNorm inputs; it has no BN layer")
    mean_terms, var_terms = [], []
    for path, observed in layers:
        running = _lookup(variables["batch_stats"], path)
        mean_terms.append(_l2_norm(observed["mean"] - running["mean"]))
        var_terms.append(_l2_norm(observed["var"] - running["var"]))
    bn_mean, bn_var = jnp.stack(mean_terms), jnp.stack(var_terms)
    per_layer = bn_mean + bn_var
    multipliers = jnp.ones_like(per_layer).at[0].set(first_bn_multiplier)
    bn = jnp.sum(multipliers * per_layer)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    loss = ce + r_bn * bn
    return loss, {"ce": ce, "bn": bn, "bn_layers": per_layer, "bn_mean": bn_mean, "bn_var": bn_var}


def bn_layer_names(
    model: nn.Module, variables: Mapping[str, Any], image_shape: Sequence[int]
) -> list[str]:
    """The BatchNorm layers of ``parts['bn_layers']``, in module order, as ``'a/b'`` paths.

    Traces the teacher once with abstract inputs (nothing is computed or compiled), so
    ``variables`` may also be ``jax.ShapeDtypeStruct`` leaves
    (:func:`ddjax.models.variable_shapes`).
    """
    _check_teacher_variables(variables)
    names: list[str] = []

    def probe(variables, images):
        # Python side effect at trace time: the collection's key order is the call order.
        _, state = model.apply(variables, images, train=False, mutable=["bn_inputs"])
        names.extend("/".join(path) for path, _ in _bn_layers(state.get("bn_inputs", {})))
        return 0

    teacher = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    jax.eval_shape(probe, teacher, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return names


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def _pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RecoverSettings:
    """The static settings of one recover run (brief §3.4-3.5).

    Attributes:
        iterations: T, Adam steps per batch (ImageNet 4000, CIFAR-100 1000).
        lr: base learning rate of the cosine policy (ImageNet 0.25).
        r_bn: weight of the BatchNorm term (ImageNet 0.01, Tiny-ImageNet 1.0).
        first_bn_multiplier: extra weight of the first BatchNorm layer (10).
        crop: draw a shared ``RandomResizedCrop`` box per iteration (off for CIFAR).
        crop_scale: its area-fraction range ((0.08, 1.0) as torchvision).
        flip: a shared random horizontal flip per iteration (off for CIFAR).
        jitter: inclusive range of the roll offsets, per axis: (0, 32) ImageNet, (-4, 4)
            Tiny-ImageNet, (0, 4) CIFAR.
        mean: per-channel mean of the normalisation (for clipping to valid pixels).
        std: per-channel standard deviation of the normalisation.
    """

    iterations: int
    lr: float
    r_bn: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    first_bn_multiplier: float = 10.0
    crop: bool = True
    crop_scale: tuple[float, float] = crops.DEFAULT_SCALE
    flip: bool = True
    jitter: tuple[int, int] = (0, 32)

    def validate(self, image_shape: Sequence[int] | None = None) -> None:
        """Raises :class:`DDJaxError` naming the first bad field (as ``config.<field>``)."""
        check(
            _is_int(self.iterations) and self.iterations >= 1,
            f"config.iterations={self.iterations!r} must be an integer >= 1",
        )
        for name in ("lr", "r_bn", "first_bn_multiplier"):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value > 0 if name == "lr" else value >= 0)
            bound = "> 0" if name == "lr" else ">= 0"
            check(ok, f"config.{name}={value!r} must be a finite number {bound}")
        for name in ("crop", "flip"):
            check(
                isinstance(getattr(self, name), bool),
                f"config.{name}={getattr(self, name)!r} must be True or False",
            )
        scale = _pair(self.crop_scale)
        check(
            len(scale) == 2
            and all(isinstance(s, int | float) for s in scale)
            and 0 < scale[0] <= scale[1] <= 1,
            f"config.crop_scale={self.crop_scale!r} must be (low, high) with "
            "0 < low <= high <= 1, e.g. (0.08, 1.0)",
        )
        jitter = _pair(self.jitter)
        check(
            len(jitter) == 2 and all(_is_int(j) for j in jitter) and jitter[0] <= jitter[1],
            f"config.jitter={self.jitter!r} must be an inclusive integer range (low, high) "
            "with low <= high, e.g. (0, 32) or (-4, 4)",
        )
        check(
            len(self.mean) == len(self.std) >= 1 and all(s > 0 for s in self.std),
            f"normalisation mean={self.mean} / std={self.std} must have one positive std per "
            "channel",
        )
        if image_shape is not None:
            height, width, channels = image_shape
            check(
                channels == len(self.mean),
                f"normalisation has {len(self.mean)} channels, the images have {channels}",
            )
            largest = max(abs(j) for j in jitter)
            check(
                largest < min(height, width),
                f"config.jitter={tuple(jitter)} rolls by up to {largest} px, not less than the "
                f"{height}x{width} image; use a range within ±{min(height, width) - 1}",
            )

    def pixel_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``((0 − m)/s, (1 − m)/s)``: the normalised image of [0, 1]."""
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (0.0 - mean) / std, (1.0 - mean) / std


class RecoverState(NamedTuple):
    """What changes from one recover iteration to the next (one batch).

    Attributes:
        images: ``(N, H, W, C)`` the images being optimised, in normalised space.
        opt_state: Adam's moments (``optax.ScaleByAdamState``).
        step: iteration t (int32), which sets the cosine learning rate.
        key: PRNG key of the next iteration's augmentation.
        skips: the :class:`ddjax.guard.Skips` counters (updates refused as non-finite).
    """

    images: Array
    opt_state: optax.OptState
    step: Array
    key: Array
    skips: guard.Skips = guard.no_skips()


def _adam() -> optax.GradientTransformation:
    """PyTorch Adam's direction ``m̂/(√v̂ + ε)``; the (scheduled) rate is applied by the step."""
    return optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)


def init_state(key: Array, num_images: int, image_shape: Sequence[int]) -> RecoverState:
    """A fresh batch: N(0, 1) images in normalised space (``torch.randn``) and a fresh Adam.

    Args:
        key: the batch's key; split into the noise key and the augmentation key.
        num_images: batch size (static).
        image_shape: ``(H, W, C)``.

    Returns:
        The :class:`RecoverState` at iteration 0. The images are not clipped yet, as in SRe2L
        (the first clip follows the first update).
    """
    noise_key, run_key = jax.random.split(key)
    # float32, or float64 under ``jax_enable_x64`` (so a float64 teacher is matched in float64).
    images = jax.random.normal(noise_key, (num_images, *image_shape), jnp.result_type(float))
    skips = guard.Skips(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    return RecoverState(images, _adam().init(images), jnp.zeros((), jnp.int32), run_key, skips)


def cosine_lr(step: Array | int, iterations: int, lr: float | Array) -> Array:
    """SRe2L's ``lr_cosine_policy(lr, 0, T)`` at iteration t: ``0.5·(1 + cos(πt/T))·lr``."""
    return (
        0.5 * (1.0 + jnp.cos(jnp.pi * jnp.asarray(step, jnp.result_type(float)) / iterations)) * lr
    )


def multi_crop(images: Array, key: Array, settings: RecoverSettings) -> Array:
    """SRe2L's per-iteration augmentation, one draw shared by the whole batch.

    ``RandomResizedCrop(size=H×W, scale)`` → ``RandomHorizontalFlip()`` → ``torch.roll`` by
    ``(off_h, off_w)`` ~ U{jitter} each (brief §3.3). The crop and flip are skipped when off
    in ``settings`` (CIFAR). Keys: ``crop, flip, roll = split(key, 3)``.

    Args:
        images: ``(N, H, W, C)``.
        key: PRNG key.
        settings: which parts are on and their ranges.

    Returns:
        The augmented images, same shape, differentiable w.r.t. ``images``.
    """
    crop_key, flip_key, roll_key = jax.random.split(key, 3)
    num, height, width, _ = images.shape
    if settings.crop:
        box = crops.rrc_boxes(crop_key, 1, height, width, scale=settings.crop_scale)
        images = crops.resized_crop(images, jnp.broadcast_to(box, (num, 4)), height, width)
    if settings.flip:
        flip = jax.random.uniform(flip_key) < 0.5  # torch.rand(1) < p with p = 0.5
        images = crops.flip(images, jnp.broadcast_to(flip, (num,)))
    low, high = settings.jitter
    offsets = jax.random.randint(roll_key, (2,), low, high + 1)  # random.randint: inclusive
    return crops.roll(images, offsets[0], offsets[1])


def make_recover_step(
    model: nn.Module,
    settings: RecoverSettings,
    *,
    batch_sharding: jax.sharding.Sharding | None = None,
    donate: bool = True,
    compiler_options: dict | None = None,
) -> Callable[[RecoverState, Any, Array], tuple[RecoverState, dict[str, Array]]]:
    """Builds ``recover_step(state, variables, labels) -> (state, metrics)``, jitted.

    One SRe2L iteration (brief §3.4): set the cosine learning rate for t = ``state.step``;
    augment the batch (:func:`multi_crop`); take the gradient of :func:`recover_loss`
    w.r.t. the images; Adam(0.5, 0.9, 1e-8) update; clip each channel to the normalised
    [0, 1] range. The update is kept only if the loss and the new images and moments are
    finite (:mod:`ddjax.guard`; ``state.skips`` counts the others).

    Args:
        model: the teacher.
        settings: the run's :class:`RecoverSettings` (closed over; never a jit argument).
        batch_sharding: placement of the batch, e.g. ``NamedSharding(mesh, P('data'))``; the
            augmented batch is constrained to it so the teacher's activations are split over
            the devices, while the BatchNorm statistics stay those of the whole batch.
        donate: donate the state's buffers to the new state.
        compiler_options: XLA compiler options (tests compile fast with them).

    Returns:
        The jitted step; it traces once per batch shape. ``metrics``: ``loss``, ``ce``,
        ``bn``, ``bn_layers``, ``bn_mean``, ``bn_var`` (of the augmented batch *before* the
        update) and ``lr`` (the rate used).
    """
    settings.validate()
    adam = _adam()
    lower, upper = settings.pixel_bounds()

    def recover_step(state: RecoverState, variables: Any, labels: Array):
        key, augment_key = jax.random.split(state.key)
        lr = cosine_lr(state.step, settings.iterations, settings.lr)

        def objective(images):
            augmented = multi_crop(images, augment_key, settings)
            if batch_sharding is not None:
                augmented = jax.lax.with_sharding_constraint(augmented, batch_sharding)
            return recover_loss(
                model,
                variables,
                augmented,
                labels,
                r_bn=settings.r_bn,
                first_bn_multiplier=settings.first_bn_multiplier,
            )

        (loss, parts), grads = jax.value_and_grad(objective, has_aux=True)(state.images)
        direction, opt_state = adam.update(grads, state.opt_state)
        images = jnp.clip(state.images - lr * direction, lower, upper)
        # The guard: a non-finite loss or new state keeps the images and Adam's moments (the
        # iteration, hence the learning rate, and the key advance).
        (images, opt_state), accepted = guard.guard(
            (images, opt_state), (state.images, state.opt_state), loss
        )
        skips = guard.count(state.skips, accepted)
        new_state = RecoverState(images, opt_state, state.step + 1, key, skips)
        return new_state, {"loss": loss, "lr": lr, **parts}

    return xla.jit(
        recover_step,
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options,
    )


def batch_sharding_for(num_images: int) -> NamedSharding | None:
    """The batch's placement: split over the ``data`` axis of as many devices as divide it.

    SRe2L's multi-GPU recover splits *batches* between GPUs; here one batch is split over the
    devices (spec §1.9), and the BN statistics stay those of the whole batch (see the module
    docstring). The data axis gets the largest device count that divides ``num_images``, so
    every device holds the same number of images.

    Args:
        num_images: the batch size.

    Returns:
        ``NamedSharding(mesh, P('data'))``, or None when only one device would be used.
    """
    devices = sharding.even_devices(num_images)
    if devices is None:  # processes cannot share the batch evenly: every device holds it all
        return NamedSharding(sharding.make_mesh(pool=1, data=jax.device_count()), P())
    if len(devices) == 1:
        return None
    return NamedSharding(sharding.make_mesh(pool=1, data=len(devices), devices=devices), P("data"))


def state_to_host(state: RecoverState) -> dict[str, np.ndarray]:
    """A batch's :class:`RecoverState` as named host arrays: what an in-batch checkpoint holds.

    Names are the state's paths (``images``, ``opt_state/count``, ``opt_state/mu``,
    ``opt_state/nu``, ``step``, ``key``); the PRNG key is stored as its raw data. In a
    multi-process run every process calls this together (the sharded images are gathered).
    """
    raw = state._replace(key=jax.random.key_data(state.key))
    leaves, _ = jax.tree_util.tree_flatten_with_path(distributed.to_host(raw))
    return {_leaf_name(path): np.asarray(leaf) for path, leaf in leaves}


def state_from_host(arrays: Mapping[str, np.ndarray], like: RecoverState) -> RecoverState:
    """The inverse of :func:`state_to_host`, checked against ``like`` (a fresh state of the batch).

    Raises:
        DDJaxError: an array is missing or has another shape or dtype than the batch's (a
            checkpoint of another batch, or written with another ``jax_enable_x64``).
    """
    raw = like._replace(key=jax.random.key_data(like.key))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(raw)
    restored = []
    for path, leaf in leaves:
        name = _leaf_name(path)
        saved = arrays.get(name)
        if saved is None or saved.shape != leaf.shape or saved.dtype != leaf.dtype:
            found = "missing" if saved is None else f"{saved.dtype}{list(saved.shape)}"
            raise DDJaxError(
                f"checkpoint array {name!r} is {found}, the batch needs "
                f"{leaf.dtype}{list(leaf.shape)}; delete the checkpoint to restart the batch"
            )
        restored.append(saved)
    state = jax.tree.unflatten(treedef, restored)
    key = jax.random.wrap_key_data(state.key, impl=jax.random.key_impl(like.key))
    return state._replace(key=key)


def _leaf_name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def recover_batch(
    step: Callable,
    variables: Any,
    labels: Array | np.ndarray,
    key: Array,
    settings: RecoverSettings,
    image_shape: Sequence[int],
    *,
    batch_sharding: jax.sharding.Sharding | None = None,
    log_every: int = 0,
    on_log: Callable[[int, dict], None] | None = None,
    on_step: Callable[[], None] | None = None,
    start_state: Mapping[str, np.ndarray] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    on_skip: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Recovers one batch: ``settings.iterations`` steps from fresh noise and a fresh Adam.

    A batch can be checkpointed while it runs and resumed from such a checkpoint: the state
    holds everything the remaining iterations depend on (images, Adam's moments, the
    iteration that sets the learning rate, the key of the next augmentation), so a resumed
    batch ends with the same images as an uninterrupted one (bit for bit on one machine).

    Args:
        step: from :func:`make_recover_step` (built with the same ``batch_sharding``).
        variables: the teacher's variables (replicated over the mesh when sharded).
        labels: ``(N,)`` target classes.
        key: the batch's key (see :func:`init_state`).
        settings: as given to :func:`make_recover_step`.
        image_shape: ``(H, W, C)``.
        batch_sharding: placement of the images, Adam's moments and the labels.
        log_every: call ``on_log(iteration, metrics)`` every this many iterations (0: never).
        on_log: receives host copies of the metrics after iteration ``iteration`` (1-based).
        on_step: called after every iteration (progress bars).
        start_state: the arrays an earlier ``on_checkpoint`` received: go on from that
            iteration instead of from fresh noise (``key`` must be the same batch key).
        checkpoint_every: call ``on_checkpoint`` every this many iterations (0: never); not
            after the last iteration (the batch is finished then).
        on_checkpoint: receives ``(iteration, state_to_host(state))``; every process calls it.
        on_skip: receives ``(iteration, count)``: ``count`` updates were skipped as
            non-finite (:mod:`ddjax.guard`) since the previous call; the counters are read
            where the metrics are logged, a checkpoint is taken, and at the end (no sync per
            iteration).

    Returns:
        ``(images, metrics)``: the last iterate as a host array and the last iteration's
        metrics (loss parts of the last augmented batch) as host arrays.

    Raises:
        DDJaxError: a ``start_state`` of another batch, or of a finished one; a batch that
            cannot make progress: :data:`ddjax.guard.MAX_CONSECUTIVE_SKIPS` consecutive
            skipped updates where the counters are read, or every update skipped.
    """
    labels = jnp.asarray(labels, jnp.int32)
    state = init_state(key, int(labels.shape[0]), image_shape)
    if start_state is not None:
        state = jax.device_put(state_from_host(start_state, state))
    first = int(state.step)
    check(
        0 <= first < settings.iterations,
        f"the checkpoint is at iteration {first}, the batch runs {settings.iterations}",
    )
    if batch_sharding is not None:
        mesh = batch_sharding.mesh
        state = RecoverState(
            sharding.put(state.images, batch_sharding),
            sharding.put(state.opt_state, _batch_sharding_tree(state.opt_state, batch_sharding)),
            sharding.replicate(state.step, mesh),
            sharding.replicate(state.key, mesh),
            sharding.replicate(state.skips, mesh),
        )
        labels = sharding.put(labels, batch_sharding)
        variables = sharding.replicate(variables, mesh)
    metrics: dict[str, Any] = {}
    reported = [int(distributed.to_host(state.skips.total))]

    def watch(iteration: int, skips: guard.Skips) -> None:
        """Reports the skips since the last look; stops a batch that cannot make progress."""
        total, streak = int(skips.total), int(skips.streak)
        if total > reported[0] and on_skip is not None:
            on_skip(iteration, total - reported[0])
        reported[0] = total
        where, kept = f"iteration {iteration} of the batch", "finished batches are kept"
        guard.check_progress(streak, stage="recover", where=where, kept=kept)
        if streak >= settings.iterations:
            skipped = f"all {settings.iterations} updates of the batch were skipped"
            raise DDJaxError(guard.no_progress("recover", skipped, kept))

    for iteration in range(first + 1, settings.iterations + 1):
        state, metrics = step(state, variables, labels)
        logged = on_log is not None and loop.every(log_every, iteration)
        if logged:
            on_log(iteration, distributed.to_host(metrics))
        due = iteration < settings.iterations and loop.every(checkpoint_every, iteration)
        if logged or due or iteration == settings.iterations:
            watch(iteration, distributed.to_host(state.skips))
        if on_checkpoint is not None and due:
            on_checkpoint(iteration, state_to_host(state))
        if on_step is not None:
            on_step()
    images = np.asarray(distributed.to_host(state.images))
    return images, {name: np.asarray(value) for name, value in distributed.to_host(metrics).items()}


def _batch_sharding_tree(tree: Any, batch_sharding: NamedSharding) -> Any:
    """Shardings for a pytree: leaves with a batch axis split like the images, others replicated."""
    replicated = sharding.replicated(batch_sharding.mesh)
    return jax.tree.map(lambda x: batch_sharding if jnp.ndim(x) >= 1 else replicated, tree)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


class RecoverBatch(NamedTuple):
    """One independently optimised batch: image ``k`` is ``(classes[k], ipc_ids[k])``."""

    classes: np.ndarray
    ipc_ids: np.ndarray


def plan_batches(
    num_classes: int, ipc: int, batch_size: int, batching: str = "distinct_classes"
) -> list[RecoverBatch]:
    """The batches of a recover run, in the order they are optimised.

    ``distinct_classes`` is SRe2L's single-GPU loop (brief §3.2)::

        for ipc_id in range(ipc):
            for first in range(0, num_classes, batch_size):
                batch = classes first .. min(first + batch_size, num_classes) - 1, one image each

    so a batch never holds two images of a class (the last batch of an ipc index is smaller
    when ``batch_size`` does not divide the classes). ``class_wise`` (LPLD) holds one class
    per batch: ``for c in classes: for first in range(0, ipc, batch_size)``.

    Args:
        num_classes: classes of the dataset.
        ipc: images per class.
        batch_size: at most this many images per batch.
        batching: one of :data:`BATCHINGS`.

    Returns:
        The list of :class:`RecoverBatch`; together they hold every (class, ipc_id) once.

    Raises:
        DDJaxError: bad sizes, or a batch size larger than what one batch can hold.
    """
    check(batching in BATCHINGS, f"config.batching={batching!r} is not one of {list(BATCHINGS)}")
    check(_is_int(ipc) and ipc >= 1, f"config.ipc={ipc!r} must be an integer >= 1")
    check(
        _is_int(batch_size) and batch_size >= 1,
        f"config.batch_size={batch_size!r} must be an integer >= 1",
    )
    batches = []
    if batching == "distinct_classes":
        check(
            batch_size <= num_classes,
            f"config.batch_size={batch_size} exceeds the {num_classes} classes: with "
            "batching='distinct_classes' a batch holds distinct classes, one image each; use "
            f"batch_size <= {num_classes} or batching='class_wise'",
        )
        for ipc_id in range(ipc):
            for first in range(0, num_classes, batch_size):
                classes = np.arange(first, min(first + batch_size, num_classes), dtype=np.int32)
                batches.append(RecoverBatch(classes, np.full_like(classes, ipc_id)))
    else:
        check(
            batch_size <= ipc,
            f"config.batch_size={batch_size} exceeds ipc={ipc}: with batching='class_wise' a "
            f"batch holds images of one class; use batch_size <= {ipc}",
        )
        for label in range(num_classes):
            for first in range(0, ipc, batch_size):
                ipc_ids = np.arange(first, min(first + batch_size, ipc), dtype=np.int32)
                batches.append(RecoverBatch(np.full_like(ipc_ids, label), ipc_ids))
    return batches


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def jpeg_round_trip(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], quality: int = 75
) -> np.ndarray:
    """SRe2L's saved images: de-normalise, ``uint8(floor(255·x))``, PIL JPEG, decode, normalise.

    The reference's ``denormalize`` (``clamp(x·s + m, 0, 1)``), then
    ``(x * 255).astype(np.uint8)`` (a floor), then ``PIL.Image.save(..jpg)`` at PIL's default
    quality 75 (brief §3.4); relabel and validation read those files back.

    Args:
        images: ``(N, H, W, C)`` normalised images, C = 1 or 3.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        quality: PIL JPEG quality (1-95).

    Returns:
        The decoded images, normalised again, float32.
    """
    check(
        _is_int(quality) and 1 <= quality <= 95,
        f"config.jpeg_quality={quality!r} must be 1..95 (0 in the config turns JPEG off)",
    )
    images = np.asarray(images, np.float32)
    check(images.ndim == 4 and images.shape[-1] in (1, 3), "JPEG needs NHWC images, C = 1 or 3")
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    pixels = np.clip(images * std + mean, 0.0, 1.0)
    codes = (pixels * 255).astype(np.uint8)
    decoded = np.empty_like(codes)
    for index, image in enumerate(codes):
        buffer = io.BytesIO()
        mode = "L" if image.shape[-1] == 1 else "RGB"
        Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(
            buffer, format="JPEG", quality=quality
        )
        buffer.seek(0)
        with Image.open(buffer) as read:
            array = np.asarray(read.convert(mode))
        decoded[index] = array[..., None] if mode == "L" else array
    return ((decoded.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
