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
   ``SGD([image_syn_c])``; here :class:`ddjax.distill.mtt.StepConfig` ``num_frozen = C·spc``
   keeps the selected images out of the optimised pytree, so they stay bit-identical). Labels
   are hard; the learnable step size is learned as in MTT.
4. **Evaluation** (:mod:`ddjax.evaluate` protocol ``'selmatch'``): ResNet-18-BN, SGD lr 0.1
   with momentum 0.9, weight decay 5e-4, cosine annealing to 0.001, batch 128, and the
   ``'combined'`` augmentation -- DSA per distilled image, crop+flip per selected one (the
   set's ``meta['num_distilled'] = C·cpc``).

Everything else is MTT's step (any gradient mode, sharded inner minibatches): SelMatch's
distillation defaults are N = 55, M = 2, T⁺ = 80, batch_syn 125, lr_img 1000, lr_lr 1e-5,
α₀ = 0.001, ConvNet-BN, 10,000 iterations (:func:`ddjax.distill.run.selmatch_config`).

Deliberate differences from the release:

* **Scores.** SelMatch reads its shipped files; ddjax takes the experts' forgetting counts
  (``scores='forgetting'``) or any ``.npy``/``.npz`` file, with the direction stated
  (``scores_higher``) and the file's labels checked against the dataset's train order.
* **Randomness** is NumPy's/JAX's with explicit seeds (``init='random'`` draws a permutation
  per class from ``default_rng(seed)``; SelMatch uses the global NumPy generator).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ddjax import difficulty
from ddjax.data import Dataset, check_ipc
from ddjax.difficulty import DifficultyScores, WindowSplit
from ddjax.errors import check

__all__ = ["INITS", "SelMatchSet", "initial_set"]

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
        """C·spc: the trailing frozen images (``StepConfig.num_frozen``)."""
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
