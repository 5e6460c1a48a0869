"""Forgetting events (Toneva et al., "An Empirical Study of Example Forgetting during Deep Neural
Network Learning", ICLR 2019, §2), counted from the train step's own per-example correctness.

A *forgetting event* is an example classified correctly at its previous presentation and
incorrectly now. Examples never classified correctly get the score ``presentations`` -- more
than any learned example can reach -- so that they rank as the most forgettable (Toneva et al.,
SelMatch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["ForgettingState", "forgetting_counts", "forgetting_init", "forgetting_update"]


class ForgettingState(NamedTuple):
    """Per-example forgetting bookkeeping; arrays of shape ``(..., num_examples)``.

    Attributes:
      previous: bool, correct at the latest presentation (false before the first).
      learned: bool, correct at some presentation so far.
      events: int32, forgetting events so far (correct -> incorrect transitions).
    """

    previous: np.ndarray
    learned: np.ndarray
    events: np.ndarray


def forgetting_init(shape: int | Sequence[int]) -> ForgettingState:
    """The state before the first presentation, e.g. ``forgetting_init((num_experts, n))``."""
    shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    return ForgettingState(np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, np.int32))


def forgetting_update(
    state: ForgettingState, correct: np.ndarray, presented: np.ndarray | None = None
) -> ForgettingState:
    """Records one presentation of every example, or of the examples ``presented``.

    Args:
      state: the state so far.
      correct: bool, like the state (``presented=None``) or ``(..., len(presented))``.
      presented: the examples of this presentation (an epoch on a subset, e.g. PAD's
        schedule); the others keep their state.
    """
    correct = np.asarray(correct, bool)
    if presented is not None:
        previous, learned, events = (np.array(a) for a in state)
        forgotten = previous[..., presented] & ~correct
        previous[..., presented] = correct
        learned[..., presented] |= correct
        events[..., presented] += forgotten.astype(np.int32)
        return ForgettingState(previous, learned, events)
    forgotten = state.previous & ~correct
    return ForgettingState(
        previous=correct,
        learned=state.learned | correct,
        events=state.events + forgotten.astype(np.int32),
    )


def forgetting_counts(state: ForgettingState, presentations: int) -> np.ndarray:
    """Forgetting counts: the events, or ``presentations`` for never-learned examples (int32)."""
    return np.where(state.learned, state.events, np.int32(presentations)).astype(np.int32)
