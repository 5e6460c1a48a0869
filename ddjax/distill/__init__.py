"""Distillation by trajectory matching (MTT and the variants built on its core).

* :mod:`ddjax.distill.matching` -- the student's inner unroll, MTT's matching loss and its
  gradient modes (exact backprop, rematerialised backprop, TESLA's estimator).
"""

from ddjax.distill.matching import (
    LOOPS,
    MODES,
    MatchGrads,
    from_mtt_flat,
    inner_batch_indices,
    inner_unroll,
    match_loss,
    match_loss_and_grads,
)

__all__ = [
    "LOOPS",
    "MODES",
    "MatchGrads",
    "from_mtt_flat",
    "inner_batch_indices",
    "inner_unroll",
    "match_loss",
    "match_loss_and_grads",
]
