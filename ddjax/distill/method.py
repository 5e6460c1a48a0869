"""The plug-in interface of trajectory matching: what a method may change in MTT's iteration.

A method is a small frozen dataclass (hashable, so it can be a static argument of the jitted
step) whose methods are *hooks*. :func:`ddjax.distill.core.make_distill_step` calls the
**step hooks** inside the jitted step (they must be pure and traceable); the driver
(:mod:`ddjax.distill.run`) calls the **run hooks** on the host. Every hook's default here is
plain MTT (Cazenavette et al. 2022), so a variant overrides only what it changes, and the
core knows no variant: DATM, TESLA's labels, SelMatch and PAD are subclasses in their own
modules, found by name through :mod:`ddjax.distill.registry`.

Step hooks (pure, traced once per compilation):

* :meth:`Method.draw_start_epoch` -- which expert epoch the student starts from.
* :meth:`Method.step_labels` -- the labels of this iteration (TESLA: assigned by the expert).
* :attr:`Method.label_transform` -- labels → inner-loop targets (DATM: softmax of logits).
* :meth:`Method.label_optimizer` -- learn the labels with this optimiser (``None``: fixed).
* :meth:`Method.learnable` / :meth:`Method.merge` -- which images are learned and how the
  updated part goes back (SelMatch: the trailing selected images stay frozen).
* :meth:`Method.within_bounds` -- an extra acceptance rule for an update (DATM: threshold).
* :meth:`Method.param_weights` -- per-parameter weights of the matching loss (PAD's mask).

Run hooks (host side, in the order a run calls them):

* :meth:`Method.check_config` (class method) -- the method's config fields, before any data.
* :meth:`Method.from_config` (class method) -- the frozen method object of a config.
* :meth:`Method.prepare` -- data-dependent checks and work before the work directory exists.
* :meth:`Method.initial_set` -- the initial images and labels.
* :meth:`Method.label_template` -- labels of the right shape to restore a checkpoint into.
* :meth:`Method.saved_labels` / :meth:`Method.synset_meta` -- how a synthetic set is written.
* :meth:`Method.eval_model`, :meth:`Method.eval_options`, :meth:`Method.evaluates_at` -- how
  and when the set is evaluated during the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddjax import select as select_lib
from ddjax.data import Dataset
from ddjax.errors import check

__all__ = ["InitContext", "Method"]

Array = jax.Array
Params = Any


@dataclasses.dataclass
class InitContext:
    """What :meth:`Method.initial_set` may use (host side).

    Attributes:
      config: the distill config.
      dataset: the real data.
      model: the student (the experts' architecture).
      num_experts: finished experts available.
      final_params: ``final_params(position)`` is the ``params`` after the last epoch of the
        expert at ``position`` (0 … num_experts − 1, in the run's expert numbering); loaded
        once each.
      label_expert: the position of the first expert the run uses (DATM labels a real init
        with it).
      log: ``log(**record)`` appends an ``init`` event to ``metrics.jsonl``.
      save_npz: ``save_npz(name, **arrays)`` writes ``WORKDIR/name`` atomically.
      prepared: what :meth:`Method.prepare` returned.
    """

    config: ml_collections.ConfigDict
    dataset: Dataset
    model: nn.Module
    num_experts: int
    final_params: Callable[[int], Params]
    label_expert: int
    log: Callable[..., None]
    save_npz: Callable[..., None]
    prepared: Any = None


@dataclasses.dataclass(frozen=True)
class Method:
    """Plain MTT; subclasses override hooks (see the module docstring).

    Attributes:
      name: the ``config.method`` value that selects this method.
      float_labels: whether the state's labels are float ``[N, classes]`` (soft labels or
        label logits) rather than int ``[N]``.
    """

    name: ClassVar[str] = "mtt"
    float_labels: ClassVar[bool] = False

    # ---------------------------------------------------------------- step hooks (pure)

    def draw_start_epoch(
        self, key: Array, iteration: Array, max_start_epoch: int
    ) -> tuple[Array, Array]:
        """``(t, bound)``: MTT draws t ~ U{0, …, T⁺ − 1} and the bound is T⁺.

        Args:
          key: this iteration's start-epoch key.
          iteration: the 0-based outer iteration (traced int32 scalar).
          max_start_epoch: T⁺ (``StepConfig.max_start_epoch``).

        Returns:
          int32 scalars: the start epoch and its exclusive upper bound this iteration.
        """
        del iteration
        bound = jnp.full((), max_start_epoch, jnp.int32)
        return jax.random.randint(key, (), 0, bound, dtype=jnp.int32), bound

    def step_labels(self, labels: Array, model: nn.Module, images: Array, target: Params) -> Array:
        """The labels this iteration trains on (MTT: the state's)."""
        del model, images, target
        return labels

    #: labels → the inner loop's targets, differentiated through (``None``: identity).
    label_transform: ClassVar[Callable[[Array], Array] | None] = None

    def label_optimizer(self) -> optax.GradientTransformation | None:
        """The labels' optimiser, or ``None`` when labels are not learned (MTT)."""
        return None

    def learnable(self, images: Array) -> Array:
        """The part of the images that is learned (MTT: all of them)."""
        return images

    def merge(self, learned: Array, images: Array) -> Array:
        """The full image array after the learnable part was updated to ``learned``."""
        del images
        return learned

    def within_bounds(self, loss: Array) -> Array:
        """Whether a finite update may be applied (MTT: always)."""
        del loss
        return jnp.bool_(True)

    def param_weights(self, model: nn.Module, params: Params, image_shape) -> Params | None:
        """Per-parameter weights of the matching loss (MTT: ``None``, every parameter 1)."""
        del model, params, image_shape
        return None

    # ---------------------------------------------------------------- run hooks (host)

    #: ``config.init`` values this method accepts.
    inits: ClassVar[tuple[str, ...]] = ("real", "noise")
    #: ``config.soft_labels`` values this method accepts.
    label_kinds: ClassVar[tuple[str, ...]] = ("none",)

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Checks the method's config fields (one-line ``DDJaxError``), before any data."""
        check(
            config.soft_labels in cls.label_kinds,
            f"config.soft_labels={config.soft_labels!r} with method={cls.name!r}: expected "
            f"{' | '.join(cls.label_kinds)}",
        )
        check(
            config.get("lr_y") is None or "learned" in cls.label_kinds,
            f"config.lr_y={config.get('lr_y')!r} is the learned labels' learning rate; "
            f"soft_labels={config.soft_labels!r} learns none (unset it)",
        )
        check(
            config.init in cls.inits,
            f"config.init={config.init!r} with method={cls.name!r}: expected "
            f"{' | '.join(cls.inits)}",
        )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> Method:
        """The method object of a (checked) config."""
        del config, num_classes
        return cls()

    def prepare(self, config: ml_collections.ConfigDict, dataset: Dataset) -> Any:
        """Data-dependent checks and work before the work directory exists (MTT: none)."""
        del config, dataset

    def initial_set(self, context: InitContext, key: Array) -> tuple[np.ndarray, np.ndarray]:
        """MTT's initial set: random real images per class (``'real'``) or N(0, 1) noise.

        Args:
          context: the run's data, experts and logging.
          key: the initialisation key (the noise of ``init='noise'``).

        Returns:
          ``(images [C·IPC, H, W, ch] float32, labels)`` with labels as the state holds them.
        """
        config, dataset = context.config, context.dataset
        real = select_lib.select(dataset, "random", config.ipc, seed=config.seed)
        images = np.asarray(real.images, np.float32)
        if config.init == "noise":
            images = np.asarray(jax.random.normal(key, images.shape), np.float32)
        return images, self.initial_labels(real.labels, dataset.num_classes)

    def initial_labels(self, classes: np.ndarray, num_classes: int) -> np.ndarray:
        """The state's labels for images of ``classes`` (MTT: the classes themselves)."""
        del num_classes
        return np.asarray(classes, np.int32)

    def label_template(self, num_images: int, num_classes: int) -> np.ndarray:
        """Zero labels with the state's shape and dtype (to restore a checkpoint into)."""
        if self.float_labels:
            return np.zeros((num_images, num_classes), np.float32)
        return np.zeros((num_images,), np.int32)

    def saved_labels(self, labels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        """``(labels of the saved set, arrays saved beside it, meta)`` from the state's labels.

        The arrays are written as ``<set>_<name>.npy`` (DATM: the learned ``label_logits``).
        """
        return labels, {}, {}

    def synset_meta(self, config: ml_collections.ConfigDict, dataset: Dataset) -> dict:
        """Extra ``meta`` of every saved synthetic set (MTT: none)."""
        del config, dataset
        return {}

    def eval_model(self, config: ml_collections.ConfigDict) -> str:
        """The architecture evaluated during the run (MTT: the student's)."""
        return config.model

    def eval_options(self, config: ml_collections.ConfigDict) -> dict:
        """Extra keyword arguments of :func:`ddjax.evaluate.evaluate_synset` (MTT: none)."""
        del config
        return {}

    def evaluates_at(self, config: ml_collections.ConfigDict, iteration: int) -> bool:
        """Whether the set is evaluated before ``iteration`` (MTT: every ``eval_every``)."""
        return iteration % config.eval_every == 0
