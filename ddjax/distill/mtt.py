"""MTT distillation: the state, the jitted ``distill_step`` and the expert schedule.

One outer iteration of MTT (Cazenavette et al. 2022, Algorithm 1; brief §1.1-1.2):

1. take the next expert e (:class:`ExpertSchedule`) and draw a start epoch
   t ~ U{0, …, T⁺−1} (``max_start_epoch``; T⁺ itself is never drawn, as ``randint``);
2. start the student at θ*_{e,t}, train it N steps (``syn_steps``) on minibatches of the
   synthetic images (MTT's chunk schedule, :func:`ddjax.distill.matching.inner_batch_indices`)
   with DSA and the learnable step size α;
3. L = ‖θ̂_N − θ*_{e,t+M}‖² / ‖θ*_{e,t} − θ*_{e,t+M}‖² (M = ``expert_epochs``);
4. SGD with momentum 0.5 (PyTorch semantics) on the images (lr ``lr_img``) and on α
   (lr ``lr_lr``).

Everything in 1-4 except picking e is one jitted function, :func:`make_distill_step`, that
compiles once per configuration and donates its state. The experts' trajectories are an
argument (a subset of experts stacked ``[E, T+1, ...]``, loaded like MTT's buffer files) and
the expert is an index into it, so switching experts or subsets never recompiles.

The variants built on this step are options of :class:`StepConfig` (brief §2-3):

* **DATM** (Guo et al. 2024; :mod:`ddjax.distill.datm`): the start epoch drawn from
  {T⁻, …, UpperBound − 1} with sequential generation of UpperBound (``min_start_epoch``,
  ``current_max_start_epoch``, ``expansion_end_iteration``), learnable soft labels
  (``soft_labels='learned'``: the state's labels are logits, learned with SGD(``lr_y``,
  momentum ``momentum_y``)) and the loss threshold (``threshold``).
* **TESLA's soft-label assignment** (Cui et al. 2023; ``soft_labels='tesla'``): every
  iteration the labels are the softmax of the target expert θ*_{t+M}'s logits on the
  un-augmented images (:func:`ddjax.distill.soft_labels.expert_soft_labels`), not learned; the
  state keeps the latest ones for evaluation. TESLA's *gradient* is ``mode='tesla'``.
* **SelMatch's partial update** (Lee & Chung 2024; :mod:`ddjax.distill.selmatch`;
  ``num_frozen``): the last ``num_frozen`` images (the selected real ones) take part in the
  inner loop, hence in the loss, but are not learned. They are kept out of the optimised
  pytree, as SelMatch's ``SGD([image_syn_c])``: the image optimiser's state covers only the
  leading learnable images, so the frozen images are bit-identical after any number of steps.

ddjax differs from the reference in two documented, optional ways:

* **Guards.** A non-finite loss, gradient or new learning rate skips the update (the state
  keeps its images, labels, α and optimiser states; the step counter and key advance) and the
  step is reported as skipped; MTT would write NaNs into the images. DATM's threshold skips
  the same way (DATM skips a loss above it, and a NaN loss, since ``NaN <= threshold`` is
  false). With ``lr_floor`` set, α is clipped to at least that value after each update (MTT
  leaves α unconstrained and issue #16 reports negative values); off by default.
* **Randomness** is JAX's: start epochs, minibatches and DSA draws come from the state's key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddjax import augment as augment_lib
from ddjax.distill import datm, matching, soft_labels
from ddjax.errors import check

__all__ = [
    "SOFT_LABELS",
    "DistillState",
    "ExpertSchedule",
    "StepConfig",
    "init_state",
    "make_distill_step",
    "make_optimizers",
]

Array = jax.Array

#: ``StepConfig.soft_labels``: MTT's fixed hard labels, TESLA's assignment, DATM's learned logits.
SOFT_LABELS = ("none", "tesla", "learned")


class DistillState(NamedTuple):
    """Everything an MTT run learns or needs to continue (a pytree of arrays).

    Attributes:
      images: the synthetic images ``[C·IPC, H, W, C]`` in the dataset's (normalised or ZCA)
        space; with ``num_frozen`` the learnable ones first, the frozen ones last.
      labels: int labels ``[C·IPC]`` (fixed in MTT), float logits ``[C·IPC, classes]``
        (``soft_labels='learned'``: DATM's learnable soft labels) or float probabilities
        ``[C·IPC, classes]`` (``soft_labels='tesla'``: the latest TESLA assignment; one-hot
        before the first iteration).
      inner_lr: the learnable student step size α (float32 scalar).
      image_opt_state: the SGD-momentum state of the learnable images (all but the last
        ``num_frozen``).
      lr_opt_state: α's SGD-momentum state.
      step: the number of iterations done (int32 scalar); DATM's ``it`` of the next one.
      key: PRNG key data (uint32 ``[2]``) for the next iteration.
      label_opt_state: the label logits' SGD-momentum state (``soft_labels='learned'``), else
        ``()``.
    """

    images: Array
    labels: Array
    inner_lr: Array
    image_opt_state: Any
    lr_opt_state: Any
    step: Array
    key: Array
    label_opt_state: Any = ()


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static settings of one MTT iteration (MTT's argument names in brackets).

    Attributes:
      syn_steps: N, student steps per iteration [``syn_steps``].
      expert_epochs: M, how many expert epochs the student should cover [``expert_epochs``].
      max_start_epoch: T⁺; the start epoch is drawn from {0, …, T⁺−1} [``max_start_epoch``].
      batch_syn: synthetic images per student step; ``None`` for all of them [``batch_syn``].
      lr_img: the images' learning rate [``lr_img``].
      lr_lr: α's learning rate [``lr_lr``].
      momentum: the outer SGD momentum (0.5 in MTT).
      mode: gradient mode, ``'remat'`` | ``'unroll'`` | ``'tesla'`` (see ``matching``).
      remat_every: nested checkpoint block size for ``'remat'`` (``None``: per step only).
      loop: ``'unrolled'`` | ``'rolled'`` | chunk length (see ``matching``).
      dsa: DSA in the inner loop (MTT's default; ``False`` is ``--no_aug``).
      dsa_strategy: the DSA groups.
      lr_floor: if set, α is clipped to at least this after each update.
      min_start_epoch: T⁻, the smallest start epoch (DATM's ``min_start_epoch``; MTT: 0).
      current_max_start_epoch: T, DATM's sequential generation: the start epoch's upper bound
        at iteration 0, growing to T⁺ (:func:`ddjax.distill.datm.start_epoch_upper_bound`);
        ``None``: no sequential generation, the bound is T⁺ [``current_max_start_epoch``].
      expansion_end_iteration: the outer iteration at which the bound reaches T⁺ (DATM's
        ``expansion_end_epoch``, which counts outer iterations).
      soft_labels: ``'none'`` (fixed hard labels), ``'tesla'`` (TESLA's assignment) or
        ``'learned'`` (DATM's learnable logits); see :data:`SOFT_LABELS`.
      lr_y: the label logits' learning rate (``'learned'`` only) [``lr_y``].
      momentum_y: their SGD momentum (DATM: 0.9) [``Momentum_y``].
      threshold: skip the update when the loss exceeds it (DATM's ``threshold``); ``None``:
        never (MTT).
      num_frozen: SelMatch's partial update: the last ``num_frozen`` images are in every
        inner minibatch draw and in the loss but never updated (0: all are learned, MTT).
    """

    syn_steps: int = 20
    expert_epochs: int = 3
    max_start_epoch: int = 25
    batch_syn: int | None = None
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    momentum: float = 0.5
    mode: str = "remat"
    remat_every: int | None = None
    loop: str | int = "unrolled"
    dsa: bool = True
    dsa_strategy: str = augment_lib.DEFAULT_STRATEGY
    lr_floor: float | None = None
    min_start_epoch: int = 0
    current_max_start_epoch: int | None = None
    expansion_end_iteration: int | None = None
    soft_labels: str = "none"
    lr_y: float | None = None
    momentum_y: float = 0.9
    threshold: float | None = None
    num_frozen: int = 0

    def validate(self, num_images: int, num_snapshots: int | None = None) -> None:
        """Raises a one-line ``DDJaxError`` naming the first bad field."""
        for name in ("syn_steps", "expert_epochs", "max_start_epoch"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and value >= 1,
                f"config.{name}={value!r} must be a positive integer",
            )
        check(
            self.batch_syn is None or (isinstance(self.batch_syn, int) and self.batch_syn >= 1),
            f"config.batch_syn={self.batch_syn!r} must be a positive integer or None (all images)",
        )
        check(self.lr_img > 0, f"config.lr_img={self.lr_img} must be positive")
        check(self.lr_lr >= 0, f"config.lr_lr={self.lr_lr} must be non-negative")
        check(0 <= self.momentum < 1, f"config.momentum={self.momentum} must be in [0, 1)")
        check(
            self.lr_floor is None or self.lr_floor > 0,
            f"config.lr_floor={self.lr_floor} must be positive (or unset for no constraint)",
        )
        matching._check_config(self.mode, self.remat_every, self.loop)
        augment_lib.parse_strategy(self.dsa_strategy)
        self._validate_variants()
        if num_snapshots is not None:
            need = self.max_start_epoch + self.expert_epochs
            check(
                num_snapshots - 1 >= need,
                f"max_start_epoch + expert_epochs = {need} needs experts trained for at least "
                f"{need} epochs, the experts have {num_snapshots - 1}",
            )
        check(
            _is_int(self.num_frozen) and self.num_frozen >= 0,
            f"num_frozen={self.num_frozen!r} must be a non-negative integer",
        )
        if num_images:
            check(
                self.num_frozen < num_images,
                f"num_frozen={self.num_frozen} leaves nothing to learn among {num_images} images",
            )

    def _validate_variants(self) -> None:
        """The DATM / TESLA options (see the class docstring)."""
        t_min, t_max = self.min_start_epoch, self.max_start_epoch
        check(
            _is_int(t_min) and 0 <= t_min < t_max,
            f"config.min_start_epoch={t_min!r} must be an integer in [0, max_start_epoch="
            f"{t_max}) (the start epoch is drawn from min_start_epoch..upper bound - 1)",
        )
        current, end = self.current_max_start_epoch, self.expansion_end_iteration
        if current is None:
            check(
                end is None,
                f"config.expansion_end_iteration={end!r} is only used with sequential "
                "generation (set config.current_max_start_epoch too, or unset it)",
            )
        else:
            check(
                _is_int(current) and t_min < current <= t_max,
                f"config.current_max_start_epoch={current!r} must be an integer in "
                f"(min_start_epoch={t_min}, max_start_epoch={t_max}]",
            )
            check(
                _is_int(end) and end >= 1,
                f"config.expansion_end_iteration={end!r} must be a positive integer with "
                "sequential generation (config.current_max_start_epoch set)",
            )
        check(
            self.soft_labels in SOFT_LABELS,
            f"config.soft_labels={self.soft_labels!r}: expected one of "
            f"{', '.join(map(repr, SOFT_LABELS))}",
        )
        if self.soft_labels == "learned":
            check(
                self.lr_y is not None and self.lr_y > 0,
                f"config.lr_y={self.lr_y!r} must be positive with soft_labels='learned'",
            )
        else:
            check(
                self.lr_y is None,
                f"config.lr_y={self.lr_y!r} is the learned labels' learning rate; "
                f"soft_labels={self.soft_labels!r} learns none (unset it)",
            )
        check(0 <= self.momentum_y < 1, f"config.momentum_y={self.momentum_y} must be in [0, 1)")
        check(
            self.threshold is None or self.threshold > 0,
            f"config.threshold={self.threshold} must be positive (or unset: never skip)",
        )

    def batch_size(self, num_images: int) -> int:
        return num_images if self.batch_syn is None else self.batch_syn


def make_optimizers(
    lr_img: float, lr_lr: float, momentum: float = 0.5
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """MTT's outer optimisers: ``torch.optim.SGD(momentum=0.5)`` on the images and on α.

    optax's ``sgd`` with momentum keeps ``buf = momentum · buf + g`` starting from zero, which
    equals PyTorch's first-step ``buf = g``; the update is ``−lr · buf``.
    """
    return (
        optax.sgd(lr_img, momentum=momentum or None),
        optax.sgd(lr_lr, momentum=momentum or None),
    )


def init_state(
    images: Array,
    labels: Array,
    inner_lr: float,
    key: Array,
    config: StepConfig,
) -> DistillState:
    """A fresh state: the initial images (real or noise), labels and α = ``lr_teacher``.

    Args:
      images: initial synthetic images ``[C·IPC, H, W, C]``.
      labels: int labels ``[C·IPC]`` (``soft_labels='none'``); float ``[C·IPC, classes]``
        label logits (``'learned'``: DATM's initial labels, e.g. from
        :func:`ddjax.distill.datm.initial_set`) or probabilities (``'tesla'``: one-hot
        classes, replaced by the first iteration's assignment).
      inner_lr: α₀ (MTT's ``lr_teacher``).
      key: PRNG key (typed or raw); the run's randomness all derives from it.
      config: the step settings (for the optimisers).

    Raises:
      DDJaxError: if the labels do not fit ``config.soft_labels``.
    """
    tx_img, tx_lr = make_optimizers(config.lr_img, config.lr_lr, config.momentum)
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels)
    soft = config.soft_labels != "none"
    check(
        labels.ndim == (2 if soft else 1) and labels.shape[0] == images.shape[0],
        f"soft_labels={config.soft_labels!r} needs labels of shape "
        f"{'[num_images, num_classes]' if soft else '[num_images]'} for {images.shape[0]} "
        f"images, got {tuple(labels.shape)}",
    )
    if soft:
        labels = labels.astype(jnp.float32)
    label_opt_state: Any = ()
    if config.soft_labels == "learned":
        label_opt_state = datm.label_optimizer(config.lr_y, config.momentum_y).init(labels)
    lr = jnp.asarray(inner_lr, jnp.float32)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    check(
        0 <= config.num_frozen < images.shape[0],
        f"num_frozen={config.num_frozen} must be in [0, {images.shape[0]}) for "
        f"{images.shape[0]} images",
    )
    return DistillState(
        images=images,
        labels=labels,
        inner_lr=lr,
        image_opt_state=tx_img.init(_learnable(images, config.num_frozen)),
        lr_opt_state=tx_lr.init(lr),
        step=jnp.zeros((), jnp.int32),
        key=jnp.asarray(key, jnp.uint32),
        label_opt_state=label_opt_state,
    )


def make_distill_step(
    model: nn.Module,
    config: StepConfig,
    *,
    batch_sharding: jax.sharding.Sharding | None = None,
    donate: bool = True,
    compiler_options: dict | None = None,
):
    """Builds ``distill_step(state, trajectories, expert) -> (state, metrics)``, jitted.

    One outer iteration of MTT, or of DATM / MTT with TESLA's labels (module docstring):

    1. t ~ U{T⁻, …, UpperBound − 1}, UpperBound from ``state.step`` (MTT: T⁻ = 0,
       UpperBound = T⁺); start θ*_{e,t}, target θ*_{e,t+M};
    2. labels: the state's (hard, or softmax of DATM's logits), or TESLA's assignment from the
       target expert;
    3. L and its gradients (:func:`ddjax.distill.matching.match_loss_and_grads`, or
       :func:`ddjax.distill.datm.match_loss_and_grads_with_label_logits` for learned labels);
    4. the SGD-momentum updates of the images (all but the last ``num_frozen``: SelMatch's
       partial update), α and learned labels, all applied only if L, the gradients and the
       new α are finite and L ≤ ``threshold`` (when set).

    Args:
      model: the student (the experts' architecture).
      config: the static settings (:class:`StepConfig`).
      batch_sharding: placement of each inner minibatch, e.g. ``NamedSharding(mesh,
        PartitionSpec('data'))`` to split it over the mesh's data axis.
      donate: donate the state's buffers to the new state (the caller must not reuse the
        old state). Off for tests that compare states.
      compiler_options: XLA compiler options for the step (e.g.
        ``{'xla_backend_optimization_level': 0}`` to compile fast in tests).

    Returns:
      The jitted step. ``trajectories`` is a ``params`` pytree with leading axes
      ``[E, T+1]`` (``ddjax.experts.load_trajectories``), ``expert`` an int index into E.
      ``metrics`` holds ``loss``, ``skipped`` (bool: the update was not applied),
      ``non_finite`` (non-finite loss, gradient or α), ``over_threshold`` (finite but above
      ``threshold``), ``start_epoch``, ``upper_bound`` (the start epoch's exclusive bound this
      iteration), ``inner_lr`` (after the update) and ``grad_norm`` (of the image gradient),
      plus ``label_grad_norm`` with learned labels. The step traces once per shape: the
      iteration counter, the expert and the trajectories are arguments.
    """
    tx_img, tx_lr = make_optimizers(config.lr_img, config.lr_lr, config.momentum)
    learn_labels = config.soft_labels == "learned"
    tx_labels = datm.label_optimizer(config.lr_y, config.momentum_y) if learn_labels else None
    augment = config.dsa and bool(augment_lib.parse_strategy(config.dsa_strategy))
    range_settings = dict(
        max_start_epoch=config.max_start_epoch,
        current_max_start_epoch=config.current_max_start_epoch,
        expansion_end_iteration=config.expansion_end_iteration,
    )

    def distill_step(state: DistillState, trajectories: Any, expert: Array):
        key, start_key, batch_key, augment_key = jax.random.split(state.key, 4)
        num_images = state.images.shape[0]
        upper_bound = datm.start_epoch_upper_bound(state.step, **range_settings)
        start_epoch = datm.sample_start_epoch(
            start_key, state.step, min_start_epoch=config.min_start_epoch, **range_settings
        )
        trajectory = jax.tree.map(lambda a: a[expert], trajectories)
        start = jax.tree.map(lambda a: a[start_epoch], trajectory)
        target = jax.tree.map(lambda a: a[start_epoch + config.expert_epochs], trajectory)
        indices, mask = matching.inner_batch_indices(
            batch_key, num_images, config.batch_size(num_images), config.syn_steps
        )
        labels = state.labels
        if config.soft_labels == "tesla":
            labels = soft_labels.expert_soft_labels(model, target, state.images)
        loss_and_grads = (
            datm.match_loss_and_grads_with_label_logits
            if learn_labels
            else matching.match_loss_and_grads
        )
        loss, grads = loss_and_grads(
            state.images,
            labels,
            state.inner_lr,
            start,
            target,
            indices,
            mask,
            model=model,
            augment_key=augment_key if augment else None,
            mode=config.mode,
            remat_every=config.remat_every,
            loop=config.loop,
            dsa_strategy=config.dsa_strategy,
            batch_sharding=batch_sharding,
        )
        # SelMatch's partial update: only the leading learnable images are optimised; the
        # frozen tail is copied through untouched (no update is ever added to it).
        image_grads = _learnable(grads.images, config.num_frozen)
        image_updates, image_opt_state = tx_img.update(image_grads, state.image_opt_state)
        lr_updates, lr_opt_state = tx_lr.update(grads.inner_lr, state.lr_opt_state)
        images = optax.apply_updates(_learnable(state.images, config.num_frozen), image_updates)
        if config.num_frozen:
            images = jnp.concatenate([images, state.images[num_images - config.num_frozen :]])
        inner_lr = optax.apply_updates(state.inner_lr, lr_updates)
        if config.lr_floor is not None:
            inner_lr = jnp.maximum(inner_lr, config.lr_floor)
        finite = (
            jnp.isfinite(loss)
            & jnp.all(jnp.isfinite(image_grads))
            & jnp.isfinite(grads.inner_lr)
            & jnp.isfinite(inner_lr)
        )
        label_opt_state = state.label_opt_state
        if learn_labels:
            label_updates, label_opt_state = tx_labels.update(grads.labels, label_opt_state)
            labels = optax.apply_updates(state.labels, label_updates)
            finite &= jnp.all(jnp.isfinite(grads.labels))
        # SLA labels are a function of the expert; non-finite ones must not reach evaluation.
        finite &= jnp.all(jnp.isfinite(labels))
        # DATM steps its optimisers only `if grand_loss <= threshold`.
        within = loss <= config.threshold if config.threshold is not None else jnp.bool_(True)
        accept = finite & within
        updated = (images, labels, inner_lr, image_opt_state, lr_opt_state, label_opt_state)
        kept = (
            state.images,
            state.labels,
            state.inner_lr,
            state.image_opt_state,
            state.lr_opt_state,
            state.label_opt_state,
        )
        images, labels, inner_lr, image_opt_state, lr_opt_state, label_opt_state = jax.tree.map(
            lambda new, old: jnp.where(accept, new, old), updated, kept
        )
        new_state = DistillState(
            images=images,
            labels=labels,
            inner_lr=inner_lr,
            image_opt_state=image_opt_state,
            lr_opt_state=lr_opt_state,
            step=state.step + 1,
            key=key,
            label_opt_state=label_opt_state,
        )
        metrics = {
            "loss": loss,
            "skipped": ~accept,
            "non_finite": ~finite,
            "over_threshold": finite & ~within,
            "start_epoch": start_epoch,
            "upper_bound": upper_bound,
            "inner_lr": inner_lr,
            "grad_norm": jnp.sqrt(jnp.sum(jnp.square(image_grads))),
        }
        if learn_labels:
            metrics["label_grad_norm"] = jnp.sqrt(jnp.sum(jnp.square(grads.labels)))
        return new_state, metrics

    return jax.jit(
        distill_step,
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options,
    )


def _learnable(images: Array, num_frozen: int) -> Array:
    """The learnable leading part of ``images`` (all of them when nothing is frozen)."""
    return images[: images.shape[0] - num_frozen] if num_frozen else images


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ExpertSchedule:
    """Which expert each iteration uses, as a pure function of the iteration (resumable).

    MTT loads one buffer file of experts at a time, uses its experts in shuffled order and
    then loads the next file (brief §1.2). Here: pass p over all ``num_experts`` experts uses
    the order ``permutation(seed, p)``; the order is cut into subsets of ``subset_size``
    experts, loaded one at a time; within a subset the experts are used in that order.

    Attributes:
      num_experts: experts available.
      subset_size: experts held in memory at once (MTT's 10 per buffer file).
      seed: the shuffling seed.
    """

    num_experts: int
    subset_size: int
    seed: int = 0

    def __post_init__(self):
        check(self.num_experts >= 1, "no expert trajectories to distil from (num_experts=0)")
        check(
            self.subset_size >= 1,
            f"config.experts_in_memory={self.subset_size} must be at least 1",
        )

    def order(self, pass_index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, pass_index])
        return rng.permutation(self.num_experts)

    def subset(self, iteration: int) -> tuple[tuple[int, int], np.ndarray, int]:
        """``(subset_id, experts_of_the_subset, position_within_it)`` for ``iteration``."""
        pass_index, position = divmod(iteration, self.num_experts)
        chunk, within = divmod(position, self.subset_size)
        order = self.order(pass_index)
        members = order[chunk * self.subset_size : (chunk + 1) * self.subset_size]
        return (pass_index, chunk), members, within
