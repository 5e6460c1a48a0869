"""The trajectory-matching core: the state, the jitted ``distill_step`` and the expert schedule.

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

Variants change the iteration only through the hooks of a :class:`ddjax.distill.method.Method`
(the start-epoch draw, the labels and their inner targets, the learnable part of the images,
the acceptance rule, per-parameter loss weights); this module knows none of them by name.

ddjax differs from the reference in two documented, optional ways:

* **Guards.** A non-finite loss, gradient or new state (images, labels, α, optimiser states:
  :func:`ddjax.guard.guard`) skips the update (the state keeps its images, labels, α and
  optimiser states; the step counter and key advance) and the step is reported as skipped;
  MTT would write NaNs into the images. A method's own rule
  (:meth:`~ddjax.distill.method.Method.within_bounds`, e.g. DATM's threshold) skips the same
  way. With ``lr_floor`` set, α is clipped to at least that value after each update (MTT
  leaves α unconstrained and issue #16 reports negative values); off by default.
* **Randomness** is JAX's: start epochs, minibatches and DSA draws come from the state's key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddjax import augment as augment_lib
from ddjax import guard, xla
from ddjax.distill import matching
from ddjax.distill.method import Method
from ddjax.errors import check
from ddjax.models import float_dtype

__all__ = [
    "DistillState",
    "ExpertSchedule",
    "StepConfig",
    "init_state",
    "make_distill_step",
    "make_optimizers",
]

Array = jax.Array
#: The default method: every hook at MTT's behaviour.
MTT_DEFAULTS = Method()


class DistillState(NamedTuple):
    """Everything a trajectory-matching run learns or needs to continue (a pytree of arrays).

    Attributes:
      images: the synthetic images ``[C·IPC, H, W, C]`` in the dataset's (normalised or ZCA)
        space; with a partial update (SelMatch) the learnable ones first, the frozen ones last.
      labels: int labels ``[C·IPC]`` (fixed in MTT) or float ``[C·IPC, classes]`` (a method
        with ``float_labels``: DATM's learnable logits, TESLA's latest assignment).
      inner_lr: the learnable student step size α (a scalar of the state's float dtype).
      image_opt_state: the SGD-momentum state of the learnable images.
      lr_opt_state: α's SGD-momentum state.
      step: the number of iterations done (int32 scalar); the iteration of the next one.
      key: PRNG key data (uint32 ``[2]``) for the next iteration.
      label_opt_state: the labels' optimiser state (a method that learns labels), else ``()``.
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
    """MTT's static settings of one iteration (MTT's argument names in brackets).

    How the student trains inside the iteration (model, gradient mode, loop form, DSA groups,
    batch placement) is the separate :class:`ddjax.distill.matching.InnerLoop`.

    Attributes:
      syn_steps: N, student steps per iteration [``syn_steps``].
      expert_epochs: M, how many expert epochs the student should cover [``expert_epochs``].
      max_start_epoch: T⁺; the start epoch is drawn from {0, …, T⁺−1} [``max_start_epoch``].
      batch_syn: synthetic images per student step; ``None`` for all of them [``batch_syn``].
      lr_img: the images' learning rate [``lr_img``].
      lr_lr: α's learning rate [``lr_lr``].
      momentum: the outer SGD momentum (0.5 in MTT).
      dsa: DSA in the inner loop (MTT's default; ``False`` is ``--no_aug``).
      lr_floor: if set, α is clipped to at least this after each update.
    """

    syn_steps: int = 20
    expert_epochs: int = 3
    max_start_epoch: int = 25
    batch_syn: int | None = None
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    momentum: float = 0.5
    dsa: bool = True
    lr_floor: float | None = None

    def validate(self, num_snapshots: int | None = None) -> None:
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
        if num_snapshots is not None:
            need = self.max_start_epoch + self.expert_epochs
            check(
                num_snapshots - 1 >= need,
                f"max_start_epoch + expert_epochs = {need} needs experts trained for at least "
                f"{need} epochs, the experts have {num_snapshots - 1}",
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
    method: Method = MTT_DEFAULTS,
) -> DistillState:
    """A fresh state: the initial images (real or noise), labels and α = ``lr_teacher``.

    Args:
      images: initial synthetic images ``[C·IPC, H, W, C]``.
      labels: int labels ``[C·IPC]``, or float ``[C·IPC, classes]`` for a method with
        ``float_labels`` (DATM's label logits, TESLA's one-hot start).
      inner_lr: α₀ (MTT's ``lr_teacher``).
      key: PRNG key (typed or raw); the run's randomness all derives from it.
      config: the step settings (for the optimisers).
      method: the method (labels, learnable part); MTT by default.

    Raises:
      DDJaxError: if the labels do not fit the method, or nothing is learnable.
    """
    tx_img, tx_lr = make_optimizers(config.lr_img, config.lr_lr, config.momentum)
    dtype = float_dtype()  # float32, or float64 under jax_enable_x64 (as the experts load)
    images = jnp.asarray(images, dtype)
    labels = jnp.asarray(labels)
    soft = method.float_labels
    check(
        labels.ndim == (2 if soft else 1) and labels.shape[0] == images.shape[0],
        f"method {method.name!r} needs labels of shape "
        f"{'[num_images, num_classes]' if soft else '[num_images]'} for {images.shape[0]} "
        f"images, got {tuple(labels.shape)}",
    )
    if soft:
        labels = labels.astype(dtype)
    learnable = method.learnable(images)
    check(
        learnable.shape[0] >= 1,
        f"method {method.name!r} leaves nothing to learn among {images.shape[0]} images",
    )
    tx_labels = method.label_optimizer()
    lr = jnp.asarray(inner_lr, dtype)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return DistillState(
        images=images,
        labels=labels,
        inner_lr=lr,
        image_opt_state=tx_img.init(learnable),
        lr_opt_state=tx_lr.init(lr),
        step=jnp.zeros((), jnp.int32),
        key=jnp.asarray(key, jnp.uint32),
        label_opt_state=() if tx_labels is None else tx_labels.init(labels),
    )


def make_distill_step(
    inner: matching.InnerLoop,
    config: StepConfig,
    method: Method = MTT_DEFAULTS,
    *,
    donate: bool = True,
    compiler_options: dict | None = None,
):
    """Builds ``distill_step(state, trajectories, expert) -> (state, metrics)``, jitted.

    One outer iteration (module docstring), with the method's hooks:

    1. ``(t, bound) = method.draw_start_epoch(...)``; start θ*_{e,t}, target θ*_{e,t+M};
    2. ``labels = method.step_labels(state.labels, ...)``;
    3. L and its gradients (:func:`ddjax.distill.matching.match_loss_and_grads` with
       ``method.label_transform`` and ``method.param_weights``);
    4. the SGD-momentum updates of ``method.learnable(images)`` (merged back with
       ``method.merge``), α and — when ``method.label_optimizer()`` exists — the labels, all
       applied only if L, the gradients and the whole new state are finite and
       ``method.within_bounds(L)``.

    Args:
      inner: the student and how it trains (:class:`ddjax.distill.matching.InnerLoop`).
      config: MTT's static settings (:class:`StepConfig`).
      method: the method's hooks (:class:`ddjax.distill.method.Method`; MTT by default).
      donate: donate the state's buffers to the new state (the caller must not reuse the
        old state). Off for tests that compare states.
      compiler_options: XLA compiler options for the step (e.g.
        ``{'xla_backend_optimization_level': 0}`` to compile fast in tests).

    Returns:
      The jitted step. ``trajectories`` is a ``params`` pytree with leading axes
      ``[E, T+1]`` (``ddjax.experts.load_trajectories``), ``expert`` an int index into E.
      ``metrics`` holds ``loss``, ``skipped`` (bool: the update was not applied),
      ``non_finite`` (non-finite loss, gradient, α or labels), ``over_threshold`` (finite but
      refused by the method's rule), ``start_epoch``, ``upper_bound`` (the start epoch's
      exclusive bound this iteration), ``inner_lr`` (after the update) and ``grad_norm`` (of
      the image gradient), plus ``label_grad_norm`` when labels are learned. The step traces
      once per shape: the iteration counter, the expert and the trajectories are arguments.
    """
    tx_img, tx_lr = make_optimizers(config.lr_img, config.lr_lr, config.momentum)
    tx_labels = method.label_optimizer()
    augment = config.dsa and bool(augment_lib.parse_strategy(inner.dsa_strategy))

    def distill_step(state: DistillState, trajectories: Any, expert: Array):
        key, start_key, batch_key, augment_key = jax.random.split(state.key, 4)
        num_images = state.images.shape[0]
        start_epoch, upper_bound = method.draw_start_epoch(
            start_key, state.step, config.max_start_epoch
        )
        trajectory = jax.tree.map(lambda a: a[expert], trajectories)
        start = jax.tree.map(lambda a: a[start_epoch], trajectory)
        target = jax.tree.map(lambda a: a[start_epoch + config.expert_epochs], trajectory)
        indices, mask = matching.inner_batch_indices(
            batch_key, num_images, config.batch_size(num_images), config.syn_steps
        )
        labels = method.step_labels(state.labels, inner.model, state.images, target)
        loss, grads = matching.match_loss_and_grads(
            state.images,
            labels,
            state.inner_lr,
            start,
            target,
            indices,
            mask,
            inner=inner,
            augment_key=augment_key if augment else None,
            param_weights=method.param_weights(inner.model, start, state.images.shape[1:]),
            label_transform=method.label_transform,
        )
        image_grads = method.learnable(grads.images)
        image_updates, image_opt_state = tx_img.update(image_grads, state.image_opt_state)
        lr_updates, lr_opt_state = tx_lr.update(grads.inner_lr, state.lr_opt_state)
        learned = optax.apply_updates(method.learnable(state.images), image_updates)
        images = method.merge(learned, state.images)
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
        if tx_labels is not None:
            label_updates, label_opt_state = tx_labels.update(grads.labels, label_opt_state)
            labels = optax.apply_updates(state.labels, label_updates)
            finite &= jnp.all(jnp.isfinite(grads.labels))
        updated = state._replace(
            images=images,
            labels=labels,
            inner_lr=inner_lr,
            image_opt_state=image_opt_state,
            lr_opt_state=lr_opt_state,
            label_opt_state=label_opt_state,
        )
        # The shared guard: the *new* images, labels (assigned ones are a function of the
        # expert), α and optimiser states must be finite too -- a finite gradient times a
        # huge learning rate is not.
        finite &= guard.all_finite(updated)
        within = method.within_bounds(loss)
        accept = finite & within
        # Everything learned moves only if the update is accepted; the counter and key advance.
        new_state = guard.select(accept, updated, state)
        new_state = new_state._replace(step=state.step + 1, key=key)
        inner_lr = new_state.inner_lr
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
        if tx_labels is not None:
            metrics["label_grad_norm"] = jnp.sqrt(jnp.sum(jnp.square(grads.labels)))
        return new_state, metrics

    return xla.jit(
        distill_step,
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options,
    )


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
