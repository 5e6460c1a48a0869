"""SelMatch: selection-based initialisation and partial update on ddjax's MTT core.

Lee & Chung, "SelMatch: Effectively Scaling Up Dataset Distillation via Selection-Based
Initialization and Partial Updates by Trajectory Matching" (ICML 2024); code
``Yongalls/SelMatch`` ``distill.py``, ``eval.py``, ``utils.py``; ``research/
trajectory_matching.md`` §4. SelMatch targets larger IPC (5-30 % of the data), where plain
trajectory matching falls behind random selection, by keeping part of each class real:

1. **Difficulty ranking** (:mod:`ddjax.difficulty`): each class's examples sorted hardest
   first by C-scores (ascending) or forgetting counts (descending).
2. **Sliding-window initialisation**: with cpc = ⌊IPC·α⌋, spc = IPC − cpc, ths = ⌊IPC·β⌋ and
   ``s`` a class's ranking, D_select = s[ths : ths+spc] (the harder part of the window, kept
   as real images) and D_distill = s[ths+spc : ths+IPC] (the easier part, the distillation's
   starting point). β is chosen beforehand by evaluating selection-only windows
   (:func:`ddjax.select.search_window`).
3. **Partial update**: the synthetic set is ``cat(distilled, selected)``, each part class by
   class; the inner loop samples minibatches from the whole set and the MTT loss is taken
   over it, but only the distilled images receive updates (SelMatch's
   ``SGD([image_syn_c])``; here the :class:`SelMatch` plug-in's ``learnable``/``merge`` hooks
   keep the ``num_frozen = C·spc`` selected images out of the optimised pytree, so they stay
   bit-identical). Labels are hard; the learnable step size is learned as in MTT.
4. **Evaluation** (:mod:`ddjax.evaluate` protocol ``'selmatch'``): ResNet-18-BN, SGD lr 0.1
   with momentum 0.9, weight decay 5e-4, cosine annealing to 0.001, batch 128, and the
   ``'combined'`` augmentation -- DSA per distilled image, crop+flip per selected one (the
   set's ``meta['num_distilled'] = C·cpc``).

Everything else is MTT's step (any gradient mode, sharded inner minibatches): SelMatch's
distillation defaults are N = 55, M = 2, T⁺ = 80, batch_syn 125, lr_img 1000, lr_lr 1e-5,
α₀ = 0.001, ConvNet-BN, 10,000 iterations (``configs/distill/selmatch.py``).

Deliberate differences from the release:

* **Scores.** SelMatch reads its shipped files; ddjax takes the experts' forgetting counts
  (``scores='forgetting'``) or any ``.npy``/``.npz`` file, with the direction stated
  (``scores_higher``) and the file's labels checked against the dataset's train order.
* **Randomness** is NumPy's/JAX's with explicit seeds (``init='random'`` draws a permutation
  per class from ``default_rng(seed)``; SelMatch uses the global NumPy generator).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddjax import difficulty
from ddjax.data import Dataset, check_ipc
from ddjax.difficulty import DifficultyScores, WindowSplit
from ddjax.distill.method import InitContext
from ddjax.distill.mtt import MTT
from ddjax.errors import check

__all__ = ["EVAL_ITERATIONS", "INITS", "SelMatch", "SelMatchSet", "initial_set"]

#: SelMatch's ``eval_it_pool``: the iterations at which distill.py evaluates its set.
EVAL_ITERATIONS = (0, 500, 1000, 2500, 5000, 7500, 10000)
#: The config fields a SelMatch run needs besides MTT's.
FIELDS = ("alpha", "beta", "scores", "scores_higher", "eval_iterations")

#: ``config.init`` of a SelMatch run: the sliding window (SelMatch's default) or random.
INITS = ("window", "random")


@dataclasses.dataclass(frozen=True)
class SelMatchSet:
    """SelMatch's initial synthetic set, laid out as ``cat(distilled, selected)``.

    Attributes:
      images: ``[C·IPC, H, W, ch]`` float32: C·cpc distilled (learnable) images class by
        class, then C·spc selected (frozen) images class by class.
      labels: ``[C·IPC]`` int32 hard labels in the same layout.
      distilled_indices: ``[C, cpc]`` train indices of D_distill.
      selected_indices: ``[C, spc]`` train indices of D_select.
      split: the window sizes (cpc, spc, ths).
    """

    images: np.ndarray
    labels: np.ndarray
    distilled_indices: np.ndarray
    selected_indices: np.ndarray
    split: WindowSplit

    @property
    def num_distilled(self) -> int:
        """C·cpc: the leading learnable images."""
        return int(self.distilled_indices.size)

    @property
    def num_frozen(self) -> int:
        """C·spc: the trailing frozen images (:attr:`SelMatch.num_frozen`)."""
        return int(self.selected_indices.size)


def initial_set(
    dataset: Dataset,
    ipc: int,
    alpha: float,
    beta: float,
    *,
    scores: DifficultyScores | None = None,
    init: str = "window",
    seed: int = 0,
) -> SelMatchSet:
    """SelMatch's initialisation (``distill.py``, ``--initialize window|random``).

    Args:
      dataset: the real dataset.
      ipc: images per class.
      alpha: α, the distilled fraction (cpc = ⌊IPC·α⌋ must be at least 1).
      beta: β, the window start relative to IPC (``'window'`` only).
      scores: per-example difficulty scores (``'window'`` only).
      init: ``'window'`` (D_select = s[ths : ths+spc], D_distill = s[ths+spc : ths+IPC] of
        the hardest-first ranking) or ``'random'`` (per class, the first IPC of a random
        permutation; the first spc are selected, the rest distilled, as SelMatch).
      seed: the permutation seed of ``'random'``.

    Returns:
      A :class:`SelMatchSet`.

    Raises:
      DDJaxError: bad α/β/IPC/init, no scores for ``'window'``, nothing to distil, or a
        window that does not fit a class.
    """
    check(init in INITS, f"init={init!r} with method='selmatch': expected {' | '.join(INITS)}")
    check_ipc(dataset, ipc)
    split = difficulty.window_split(ipc, alpha, beta)
    check(
        split.distill_per_class >= 1,
        f"alpha={alpha} with ipc={ipc} distils floor(ipc * alpha) = 0 images per class; raise "
        "alpha (or use ddjax select method='window' for selection only)",
    )
    if init == "window":
        check(
            isinstance(scores, DifficultyScores),
            "init='window' needs per-example difficulty scores (config.scores)",
        )
        ranking = difficulty.rank_per_class(scores, dataset.y_train, dataset.num_classes)
        selected, distilled = difficulty.window_indices(ranking, split)
    else:
        rng = np.random.default_rng(seed)
        chosen = np.stack(
            [
                rng.permutation(np.flatnonzero(dataset.y_train == c))[:ipc]
                for c in range(dataset.num_classes)
            ]
        )
        selected = chosen[:, : split.select_per_class]
        distilled = chosen[:, split.select_per_class :]
    order = np.concatenate([distilled.reshape(-1), selected.reshape(-1)])
    classes = np.arange(dataset.num_classes)
    labels = np.concatenate(
        [np.repeat(classes, split.distill_per_class), np.repeat(classes, split.select_per_class)]
    )
    return SelMatchSet(
        images=dataset.x_train[order].astype(np.float32),
        labels=labels.astype(np.int32),
        distilled_indices=distilled.astype(np.int64),
        selected_indices=selected.astype(np.int64),
        split=split,
    )


@dataclasses.dataclass(frozen=True)
class SelMatch(MTT):
    """SelMatch's hooks on MTT: the window initialisation and the partial update.

    Attributes:
      num_frozen: C·spc, the trailing selected images: in every inner minibatch draw and in
        the loss, never updated.
    """

    name: ClassVar[str] = "selmatch"
    inits: ClassVar[tuple[str, ...]] = INITS

    num_frozen: int = 0

    def __post_init__(self):
        check(
            isinstance(self.num_frozen, int)
            and not isinstance(self.num_frozen, bool)
            and self.num_frozen >= 0,
            f"num_frozen={self.num_frozen!r} must be a non-negative integer",
        )

    # ---------------------------------------------------------------- step hooks

    def learnable(self, images: jax.Array) -> jax.Array:
        return images[: images.shape[0] - self.num_frozen] if self.num_frozen else images

    def merge(self, learned: jax.Array, images: jax.Array) -> jax.Array:
        # The frozen tail is copied through untouched (no update is ever added to it).
        if not self.num_frozen:
            return learned
        return jnp.concatenate([learned, images[images.shape[0] - self.num_frozen :]])

    # ---------------------------------------------------------------- run hooks

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """SelMatch's fields (α, β, scores, evaluation iterations); data checks come later."""
        missing = [name for name in FIELDS if name not in config]
        check(
            not missing,
            f"config.method='selmatch' needs the fields {missing}, which this config lacks; "
            "start from configs/distill/selmatch.py",
        )
        super().check_config(config)
        split = difficulty.window_split(config.ipc, config.alpha, config.beta)
        check(
            split.distill_per_class >= 1,
            f"config.alpha={config.alpha} with ipc={config.ipc} distils floor(ipc * alpha) = 0 "
            "images per class; raise alpha (or use ddjax select method='window' for selection "
            "only)",
        )
        check(
            config.scores_higher in difficulty.HIGHER,
            f"config.scores_higher={config.scores_higher!r}: expected 'harder' (forgetting "
            "counts) or 'easier' (C-scores)",
        )
        if config.init == "window":
            check(
                bool(config.scores),
                "config.scores is empty: 'forgetting' (the experts' forgetting counts) or a "
                ".npy/.npz file of per-example scores (SelMatch's CIFAR runs use C-scores: "
                "--config.scores=PATH --config.scores_higher=easier)",
            )
        check(
            len(config.eval.models) >= 1,
            "config.eval.models is empty; SelMatch evaluates on its first (ResNet18BN)",
        )
        iterations = config.eval_iterations
        check(
            isinstance(iterations, tuple)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in iterations),
            f"config.eval_iterations={iterations!r} must be a tuple of non-negative iterations "
            "(empty: every eval_every)",
        )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> SelMatch:
        split = difficulty.window_split(config.ipc, config.alpha, config.beta)
        return cls(num_frozen=num_classes * split.select_per_class)

    def prepare(self, config: ml_collections.ConfigDict, dataset: Dataset) -> SelMatchSet:
        """The initial set, computed before the work directory exists (it validates the
        scores file and the windows on the way)."""
        scores = None
        if config.init == "window":
            scores = difficulty.scores_from_source(
                config.scores,
                higher=config.scores_higher,
                train_labels=dataset.y_train,
                experts_dir=config.experts_dir,
            )
        selmatch_set = initial_set(
            dataset,
            config.ipc,
            config.alpha,
            config.beta,
            scores=scores,
            init=config.init,
            seed=config.seed,
        )
        check(
            selmatch_set.num_frozen == self.num_frozen,
            f"num_frozen={self.num_frozen} does not match the window's "
            f"{selmatch_set.num_frozen} selected images",
        )
        return selmatch_set

    def initial_set(self, context: InitContext, key) -> tuple[np.ndarray, np.ndarray]:
        """The prepared set (distilled images first, then the selected ones), hard labels;
        the train indices of both parts are saved as ``selmatch_init.npz`` and the window
        logged as an ``init`` event."""
        del key
        selmatch_set: SelMatchSet = context.prepared
        split = selmatch_set.split
        context.save_npz(
            "selmatch_init.npz",
            distilled=selmatch_set.distilled_indices,
            selected=selmatch_set.selected_indices,
        )
        context.log(
            init=context.config.init,
            distilled_per_class=split.distill_per_class,
            selected_per_class=split.select_per_class,
            window_start=split.start,
            num_frozen=selmatch_set.num_frozen,
        )
        return selmatch_set.images, selmatch_set.labels

    def synset_meta(self, config: ml_collections.ConfigDict, dataset: Dataset) -> dict:
        split = difficulty.window_split(config.ipc, config.alpha, config.beta)
        return dict(
            init=config.init,
            alpha=split.alpha,
            beta=split.beta,
            scores=config.scores if config.init == "window" else "",
            scores_higher=config.scores_higher,
            window_start=split.start,
            distilled_per_class=split.distill_per_class,
            selected_per_class=split.select_per_class,
            # The leading distilled images: the 'combined' evaluation augments them with DSA.
            num_distilled=dataset.num_classes * split.distill_per_class,
        )

    def eval_model(self, config: ml_collections.ConfigDict) -> str:
        """SelMatch evaluates ``model_eval`` (ResNet-18-BN), the first of ``eval.models``."""
        return config.eval.models[0]

    def eval_options(self, config: ml_collections.ConfigDict) -> dict:
        # SelMatch's evaluate_synset augments with args.dsa_strategy, the inner loop's.
        return {"dsa_strategy": config.dsa_strategy}

    def evaluates_at(self, config: ml_collections.ConfigDict, iteration: int) -> bool:
        """At SelMatch's listed iterations (``eval_iterations``), else every ``eval_every``."""
        listed = tuple(config.eval_iterations or ())
        if listed:
            return iteration in listed
        return iteration % config.eval_every == 0
