"""Per-example difficulty scores, the per-class hardest-first ranking and SelMatch's window.

SelMatch (Lee & Chung, "SelMatch: Effectively Scaling Up Dataset Distillation via
Selection-Based Initialization and Partial Updates by Trajectory Matching", ICML 2024, §4;
code ``Yongalls/SelMatch``; ``research/trajectory_matching.md`` §4.1-4.2) and the
difficulty-based coresets (``ddjax.select`` methods ``'forgetting'`` and ``'window'``) rank
every class's training examples by a difficulty score and take a window of that ranking.

**Scores** (:class:`DifficultyScores`), one per training example in the dataset's train order:

* forgetting counts (Toneva et al. 2019) from ``ddjax experts`` (:func:`forgetting_scores`):
  higher is *harder*; never-learned examples count ``epochs``, the most of all;
* external scores from a file (:func:`load_scores`): ``.npy`` (the array) or ``.npz`` with
  ``scores`` and optionally ``labels``, checked against the dataset's train labels so that a
  file in another train order (e.g. C-scores in torchvision's CIFAR order against another
  loader's) is refused rather than silently misapplied. C-scores (Jiang et al. 2021) are
  consistency scores: higher is *easier* (brief §4.1: Spearman −0.85 against forgetting).

The sort direction is therefore never implied by the kind of score: every
:class:`DifficultyScores` says whether a higher value is ``'harder'`` or ``'easier'``.

**Ranking** (:func:`rank_per_class`): SelMatch sorts each class's indices (ascending train
order) with Python's ``sorted(..., key=score, reverse=...)``: descending forgetting counts
(``reverse=True``), ascending C-scores (``reverse=False``). Python's sort is stable in both
directions, so ties keep ascending train order; reproduced exactly by a stable arg-sort of the
hardness (the score, negated when higher is easier).

**Window** (:func:`window_split`, :func:`window_indices`), with ``s`` a class's ranking
hardest first (SelMatch ``distill.py``):

    cpc = ⌊IPC·α⌋ (distilled per class),  spc = IPC − cpc (selected per class),
    ths = ⌊IPC·β⌋ (window start),
    D_select = s[ths : ths+spc],  D_distill = s[ths+spc : ths+IPC].

With α = 0 this is SelMatch's selection-only window ``s[ths : ths+IPC]`` (``eval.py --method
window``). The floors are Python's ``int(ipc * alpha)`` on the float product, as published
(so ``int(100 * 0.29)`` is 28).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from ddjax import experts
from ddjax.errors import DDJaxError, check

__all__ = [
    "HIGHER",
    "DifficultyScores",
    "WindowSplit",
    "forgetting_scores",
    "load_scores",
    "rank_per_class",
    "scores_from_source",
    "window_indices",
    "window_split",
]

#: What a higher score means: ``'harder'`` (forgetting counts) or ``'easier'`` (C-scores).
HIGHER = ("harder", "easier")
#: ``scores_from_source``'s name for the experts' forgetting counts.
FORGETTING = "forgetting"


@dataclasses.dataclass(frozen=True)
class DifficultyScores:
    """One difficulty score per training example, with its direction made explicit.

    Attributes:
      values: ``(n_train,)`` float64 scores in the dataset's train order.
      higher: ``'harder'`` if a higher value is a harder example (forgetting counts),
        ``'easier'`` if it is an easier one (C-scores).
      source: where the scores came from (for provenance in a synthetic set's meta).
    """

    values: np.ndarray
    higher: str
    source: str = ""

    def __post_init__(self):
        check(
            self.higher in HIGHER,
            f"scores_higher={self.higher!r}: expected 'harder' (e.g. forgetting counts) or "
            "'easier' (e.g. C-scores)",
        )
        values = np.asarray(self.values)
        check(
            values.ndim == 1 and np.issubdtype(values.dtype, np.number),
            f"difficulty scores ({self.source}) must be a 1-D numeric array, got "
            f"{values.dtype} {values.shape}",
        )
        bad = np.flatnonzero(~np.isfinite(values))
        check(
            bad.size == 0,
            f"difficulty scores ({self.source}) hold {bad.size} non-finite values "
            f"(first at index {bad[0] if bad.size else -1})",
        )
        object.__setattr__(self, "values", values.astype(np.float64))

    @property
    def hardness(self) -> np.ndarray:
        """The scores oriented so that higher is harder."""
        return self.values if self.higher == "harder" else -self.values


def forgetting_scores(experts_dir: str | os.PathLike) -> DifficultyScores:
    """The mean forgetting counts of a ``ddjax experts`` directory (higher is harder).

    Args:
      experts_dir: the experts' work directory (its ``forgetting.npz``).

    Returns:
      :class:`DifficultyScores` with ``higher='harder'``.
    """
    values = experts.forgetting_scores(experts_dir)
    return DifficultyScores(values, "harder", f"forgetting counts of {experts_dir}")


def load_scores(
    path: str | os.PathLike, *, higher: str, train_labels: np.ndarray | None = None
) -> DifficultyScores:
    """Reads external per-example scores (e.g. C-scores) from ``.npy`` or ``.npz``.

    SelMatch ships ``scores/cscores_{CIFAR10,CIFAR100}.npz`` (keys ``labels``, ``scores``) and
    ``forgetting_*.npy``; the same layouts are read here.

    Args:
      path: a ``.npy`` file holding the scores, or a ``.npz`` with ``scores`` and optionally
        ``labels`` (the class of each example).
      higher: ``'harder'`` or ``'easier'``: the direction of these scores (C-scores:
        ``'easier'``). Required: a file does not say which way it points.
      train_labels: the dataset's train labels; when given, the number of scores must match
        and a ``labels`` array in the file must equal them element for element.

    Returns:
      :class:`DifficultyScores`.

    Raises:
      DDJaxError: missing or unreadable file, no ``scores`` key, wrong length, labels that
        differ from the dataset's (another train order), non-finite values, bad ``higher``.
    """
    path = Path(path)
    check(path.is_file(), f"difficulty scores file {path} does not exist")
    check(
        path.suffix in (".npy", ".npz"),
        f"difficulty scores file {path}: expected .npy (the scores) or .npz (keys 'scores' "
        "and optionally 'labels')",
    )
    labels = None
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as f:
                check(
                    "scores" in f.files,
                    f"{path} has no 'scores' array (keys: {sorted(f.files)})",
                )
                values = f["scores"]
                labels = f["labels"] if "labels" in f.files else None
    except (OSError, ValueError) as e:
        if isinstance(e, DDJaxError):
            raise
        raise DDJaxError(f"{path}: cannot read difficulty scores ({e})") from None
    values = np.asarray(values)
    check(values.ndim == 1, f"{path}: scores must be 1-D (one per example), got {values.shape}")
    if train_labels is not None:
        train_labels = np.asarray(train_labels)
        check(
            len(values) == len(train_labels),
            f"{path} has {len(values)} scores, the dataset has {len(train_labels)} train images",
        )
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            check(
                labels.shape == train_labels.shape,
                f"{path}: 'labels' has {labels.size} entries, the dataset {train_labels.size}",
            )
            differ = np.flatnonzero(labels.astype(np.int64) != train_labels.astype(np.int64))
            check(
                differ.size == 0,
                f"{path}: 'labels' differ from the dataset's train labels at {differ.size} "
                f"positions (first at index {differ[0] if differ.size else -1}); the scores "
                "must be in the dataset's train order",
            )
    return DifficultyScores(values, higher, str(path))


def scores_from_source(
    source: str,
    *,
    higher: str,
    train_labels: np.ndarray,
    experts_dir: str | os.PathLike = "",
) -> DifficultyScores:
    """Scores named by a config: ``'forgetting'`` (the experts' counts) or a file path.

    Args:
      source: ``'forgetting'`` for :func:`forgetting_scores` of ``experts_dir``, otherwise a
        ``.npy``/``.npz`` path for :func:`load_scores`.
      higher: the scores' direction; must be ``'harder'`` for forgetting counts.
      train_labels: the dataset's train labels (length and label checks).
      experts_dir: the ``ddjax experts`` directory for ``'forgetting'``.

    Raises:
      DDJaxError: empty source, a direction that contradicts forgetting counts, or any
        error of :func:`load_scores` / the experts directory.
    """
    check(
        bool(source),
        "scores is empty: use 'forgetting' (the experts' forgetting counts) or a .npy/.npz "
        "file of per-example scores",
    )
    check(
        higher in HIGHER,
        f"scores_higher={higher!r}: expected 'harder' (e.g. forgetting counts) or 'easier' "
        "(e.g. C-scores)",
    )
    if source == FORGETTING:
        check(
            higher == "harder",
            f"scores='forgetting' with scores_higher={higher!r}: forgetting counts are higher "
            "for harder examples (scores_higher='harder')",
        )
        check(
            bool(experts_dir),
            "scores='forgetting' needs the ddjax experts directory whose counts to use "
            "(experts_dir)",
        )
        scores = forgetting_scores(experts_dir)
        check(
            len(scores.values) == len(train_labels),
            f"{experts_dir} has forgetting counts for {len(scores.values)} examples, the "
            f"dataset has {len(train_labels)} train images",
        )
        return scores
    return load_scores(source, higher=higher, train_labels=train_labels)


def rank_per_class(
    scores: DifficultyScores, labels: np.ndarray, num_classes: int
) -> list[np.ndarray]:
    """Each class's train indices, hardest first (SelMatch's ``sorted(..., reverse=...)``).

    Args:
      scores: one score per training example.
      labels: ``(n_train,)`` train labels.
      num_classes: number of classes.

    Returns:
      ``num_classes`` int64 arrays of train indices; ties keep ascending train order.
    """
    labels = np.asarray(labels)
    check(
        len(scores.values) == len(labels),
        f"{len(scores.values)} difficulty scores for {len(labels)} train images",
    )
    hardness = scores.hardness
    ranking = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        ranking.append(members[np.argsort(-hardness[members], kind="stable")])
    return ranking


@dataclasses.dataclass(frozen=True)
class WindowSplit:
    """SelMatch's per-class window sizes (``distill.py``: ``args.cpc``, ``args.spc``, ``args.ths``).

    Attributes:
      ipc: images per class.
      alpha: α, the distilled fraction.
      beta: β, the window start relative to IPC.
      distill_per_class: cpc = ⌊IPC·α⌋.
      select_per_class: spc = IPC − cpc.
      start: ths = ⌊IPC·β⌋.
    """

    ipc: int
    alpha: float
    beta: float
    distill_per_class: int
    select_per_class: int
    start: int

    @property
    def select_slice(self) -> slice:
        """D_select = s[ths : ths+spc] (the harder part of the window)."""
        return slice(self.start, self.start + self.select_per_class)

    @property
    def distill_slice(self) -> slice:
        """D_distill = s[ths+spc : ths+IPC] (the easier part of the window)."""
        return slice(self.start + self.select_per_class, self.start + self.ipc)

    @property
    def end(self) -> int:
        """ths + IPC: the window's exclusive end (a class needs at least this many images)."""
        return self.start + self.ipc


def window_split(ipc: int, alpha: float, beta: float) -> WindowSplit:
    """cpc, spc and ths for IPC, α and β, with SelMatch's ``int(ipc * x)`` floors.

    Args:
      ipc: images per class (positive).
      alpha: distilled fraction in [0, 1] (0: selection only).
      beta: window start relative to IPC, ≥ 0.

    Raises:
      DDJaxError: naming the bad value.
    """
    check(
        isinstance(ipc, int | np.integer) and not isinstance(ipc, bool) and ipc >= 1,
        f"ipc={ipc!r} must be a positive integer",
    )
    check(
        isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0,
        f"alpha={alpha!r} must be a fraction in [0, 1] (the distilled part of each class)",
    )
    check(
        isinstance(beta, int | float) and beta >= 0.0,
        f"beta={beta!r} must be >= 0 (the window starts at floor(ipc * beta) in the "
        "hardest-first ranking)",
    )
    cpc = int(ipc * alpha)
    return WindowSplit(
        ipc=int(ipc),
        alpha=float(alpha),
        beta=float(beta),
        distill_per_class=cpc,
        select_per_class=int(ipc) - cpc,
        start=int(ipc * beta),
    )


def window_indices(ranking: list[np.ndarray], split: WindowSplit) -> tuple[np.ndarray, np.ndarray]:
    """D_select and D_distill of every class from the hardest-first ranking.

    Args:
      ranking: per class, train indices hardest first (:func:`rank_per_class`).
      split: the window (:func:`window_split`).

    Returns:
      ``(selected, distilled)``: int64 ``[C, spc]`` and ``[C, cpc]`` train indices, each row
      in ranking order.

    Raises:
      DDJaxError: if a class has fewer than ths + IPC examples (the window does not fit).
    """
    for c, members in enumerate(ranking):
        check(
            len(members) >= split.end,
            f"class {c} has {len(members)} train images; the window for ipc={split.ipc}, "
            f"beta={split.beta} needs floor(ipc * beta) + ipc = {split.end} (lower beta)",
        )
    selected = np.stack([members[split.select_slice] for members in ranking]).astype(np.int64)
    distilled = np.stack([members[split.distill_slice] for members in ranking]).astype(np.int64)
    return selected, distilled
