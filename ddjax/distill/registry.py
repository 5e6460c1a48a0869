"""Trajectory-matching methods by name: ``config.method`` → a :class:`~ddjax.distill.method.Method`.

Adding a method is one module (a subclass of a method, overriding the hooks it changes), one
config family under ``configs/distill/`` and one line in :data:`METHODS`. This is the only
place that chooses by method name.
"""

from __future__ import annotations

import ml_collections

from ddjax.distill.datm import DATM
from ddjax.distill.method import Method
from ddjax.distill.mtt import MTT
from ddjax.distill.pad import PAD
from ddjax.distill.selmatch import SelMatch
from ddjax.distill.tesla import TeslaLabels
from ddjax.errors import check

__all__ = ["METHODS", "method_class"]

#: ``config.method`` → its plug-in class. TESLA's labels are MTT with ``soft_labels='tesla'``.
METHODS: dict[str, type[Method]] = {
    "mtt": MTT,
    "datm": DATM,
    "selmatch": SelMatch,
    "pad": PAD,
}


def method_class(config: ml_collections.ConfigDict) -> type[Method]:
    """The plug-in class of a distill config (one-line ``DDJaxError`` for an unknown name)."""
    check(
        config.method in METHODS,
        f"config.method={config.method!r} is not known; valid: {list(METHODS)} (TESLA is "
        "method='mtt' with mode='tesla' for its gradient and soft_labels='tesla' for its labels)",
    )
    if config.method == "mtt" and config.get("soft_labels") == "tesla":
        return TeslaLabels
    return METHODS[config.method]
