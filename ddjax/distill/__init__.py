"""Distillation by trajectory matching: one core, method plug-ins, one driver.

* :mod:`ddjax.distill.matching` -- the student's inner unroll, MTT's matching loss and its
  gradient modes (exact backprop, rematerialised backprop, TESLA's estimator); the inner loop's
  settings as one frozen :class:`~ddjax.distill.matching.InnerLoop`.
* :mod:`ddjax.distill.core` -- MTT's state, the jitted ``distill_step`` and the expert schedule.
* :mod:`ddjax.distill.method` -- the plug-in interface (hooks; every default is MTT's).
* :mod:`ddjax.distill.mtt`, :mod:`~ddjax.distill.tesla`, :mod:`~ddjax.distill.datm`,
  :mod:`~ddjax.distill.selmatch`, :mod:`~ddjax.distill.pad` -- the methods, one module each,
  found by name in :mod:`ddjax.distill.registry`.
* :mod:`ddjax.distill.run` -- ``ddjax distill``: the driver (work directory, evaluation,
  checkpoints, resume).

The loss API is re-exported here: ``from ddjax.distill import InnerLoop, match_loss_and_grads``.
"""

from ddjax.distill import matching
from ddjax.distill.matching import *  # noqa: F403  (the loss API, listed in matching.__all__)

__all__ = list(matching.__all__)
