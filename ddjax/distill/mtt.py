"""MTT (Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022).

The plain method: real or noise images, fixed hard labels, start epochs drawn uniformly from
{0, …, T⁺ − 1}, every image learned, every update applied unless it is non-finite, every
parameter matched. All of it is the default behaviour of the plug-in interface
(:class:`ddjax.distill.method.Method`); this module only names it. TESLA's label assignment
(:mod:`ddjax.distill.tesla`) is ``method='mtt'`` with ``soft_labels='tesla'``; TESLA's gradient
is ``mode='tesla'`` of the inner loop (:mod:`ddjax.distill.matching`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ddjax.distill.method import Method

__all__ = ["MTT"]


@dataclasses.dataclass(frozen=True)
class MTT(Method):
    """MTT: every hook at its default (:class:`~ddjax.distill.method.Method`)."""

    name: ClassVar[str] = "mtt"
    #: hard labels, or TESLA's assignment (the registry picks :class:`TeslaLabels` for it).
    label_kinds: ClassVar[tuple[str, ...]] = ("none", "tesla")
