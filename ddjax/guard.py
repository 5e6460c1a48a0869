"""The one guard against non-finite values, shared by every optimising stage.

A learning rate that is too large, a loss that overflows or a bad batch turns a state into
NaN or inf in one update, and every later update (and every file written from that state) is
garbage. Every optimising stage of ddjax -- distill (all methods), squeeze, recover, KD
students, experts and evaluation's training -- therefore applies an update only when it is
safe, inside its jitted step (no host sync per step):

* **Accept or skip.** The update is applied only if the loss is finite and every floating
  leaf of the *new* state is finite (images, α, labels, parameters, BatchNorm statistics,
  optimiser state); otherwise the old state is kept, leaf by leaf (:func:`guard`, a
  ``jnp.where`` over the tree: where nothing is skipped the values are bit for bit those of
  the unguarded update). Counters and keys still advance, so the next step draws new data.
* **Count.** :class:`Skips` holds the skipped updates in all and the current run of
  consecutive ones (:func:`count`), inside the state of stages whose driver does not look at
  every step (recover, the epoch driver); distill's driver reads its step's ``skipped`` flag.
* **Log.** A driver logs skips to ``metrics.jsonl`` in one shape for all stages:
  ``{"event": "skipped", <where>, "count": n, "reason": ...}``, ``<where>`` being the
  stage's position (``iteration``; ``batch`` and ``iteration``; ``epoch``) and ``count`` the
  updates skipped since the previous record (a list with one count per model for a pool).
* **Stop.** A stage that cannot make progress stops with one line (``DDJaxError``, exit 2):
  :data:`MAX_CONSECUTIVE_SKIPS` consecutive skipped updates, every update of an epoch
  skipped, or (iteration-driven stages shorter than that) no update accepted at all. Every
  state a stage keeps is a guarded one, so its last checkpoint on disk is finite.
* **Write.** Nothing non-finite is written: teachers are checked when saved and when loaded
  (:func:`check_finite`), and JSON writers are strict (``allow_nan=False``); a number that
  does not exist is written as ``null`` (:func:`finite_or_none`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddjax.errors import DDJaxError

__all__ = [
    "MAX_CONSECUTIVE_SKIPS",
    "REASON",
    "Skips",
    "all_finite",
    "check_finite",
    "check_progress",
    "count",
    "finite_or_none",
    "first_non_finite",
    "guard",
    "no_progress",
    "no_skips",
    "per_model",
    "select",
]

Array = jax.Array

#: K: a stage stops after this many consecutive skipped updates. Transient non-finite steps
#: (one bad batch or expert window) are skipped and forgotten; K in a row means the
#: optimisation diverged (typically a learning rate too large) and will not recover.
MAX_CONSECUTIVE_SKIPS = 50

#: Why a guard skips an update (the ``reason`` of a ``skipped`` record).
REASON = "non-finite loss or new state"


class Skips(NamedTuple):
    """Skip counters carried in a state (int32 scalars; a pool has a leading model axis).

    Attributes:
      total: updates skipped since the state was made.
      streak: consecutive updates skipped up to now (0 after an accepted one).
    """

    total: Any
    streak: Any


def no_skips() -> Skips:
    """Fresh counters (NumPy scalars: usable as a default and under ``vmap``/``jit``)."""
    return Skips(np.int32(0), np.int32(0))


def all_finite(tree: Any) -> Array:
    """Whether every floating (or complex) leaf of ``tree`` is finite: a scalar bool."""
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return functools.reduce(jnp.logical_and, checks, jnp.bool_(True))


def guard(new: Any, old: Any, loss: Any = None, accept: Any = True) -> tuple[Any, Array]:
    """``(new if safe else old, accepted)`` for two states of the same structure.

    Args:
      new: the state after the update.
      old: the state before it.
      loss: the loss the update came from (``None``: not checked); it must be finite.
      accept: a further condition (a method's own rule), ``True`` by default.

    Returns:
      The state to keep and whether the update was accepted (a scalar bool). Leaves are
      selected with ``jnp.where``, so an accepted update is kept bit for bit.
    """
    accepted = jnp.logical_and(accept, all_finite(new))
    if loss is not None:
        accepted = jnp.logical_and(accepted, jnp.all(jnp.isfinite(loss)))
    return select(accepted, new, old), accepted


def select(accepted: Any, new: Any, old: Any) -> Any:
    """``new`` where ``accepted`` else ``old``, leaf by leaf (``jnp.where``: bit for bit)."""
    return jax.tree.map(lambda n, o: jnp.where(accepted, n, o), new, old)


def count(skips: Skips, accepted: Array) -> Skips:
    """The counters after one update that was (or was not) ``accepted``."""
    skipped = jnp.logical_not(accepted).astype(jnp.int32)
    return Skips(
        jnp.asarray(skips.total, jnp.int32) + skipped,
        jnp.where(accepted, 0, jnp.asarray(skips.streak, jnp.int32) + 1).astype(jnp.int32),
    )


def check_progress(streak: Any, *, stage: str, where: str, kept: str) -> None:
    """Stops a stage whose last :data:`MAX_CONSECUTIVE_SKIPS` updates were all skipped.

    Args:
      streak: consecutive skipped updates (an int, or one per model of a pool).
      stage: the stage's name, for the message.
      where: the position reached (``'iteration 120'``).
      kept: what holds the last good state (``'the last checkpoint in ...'``).

    Raises:
      DDJaxError: one line, when any streak reached :data:`MAX_CONSECUTIVE_SKIPS`.
    """
    longest = int(np.max(np.asarray(streak)))
    if longest >= MAX_CONSECUTIVE_SKIPS:
        skipped = f"{longest} consecutive updates up to {where} were skipped"
        raise DDJaxError(no_progress(stage, skipped, kept))


def no_progress(stage: str, skipped: str, kept: str) -> str:
    """The one-line message of a stage stopped because its updates were all skipped.

    Args:
      stage: the stage's name.
      skipped: which updates were skipped (``'all 3 updates of epoch 2 were skipped'``).
      kept: what holds the last good state.
    """
    return (
        f"{stage} cannot make progress: {skipped} ({REASON}; lower the learning rate); "
        f"stopped, {kept}"
    )


def finite_or_none(value: Any) -> Any:
    """A number for JSON: ``float(value)`` when finite, ``None`` (``null``) otherwise.

    Lists, tuples and arrays are converted element by element.
    """
    if isinstance(value, np.ndarray | jax.Array) and np.ndim(value) > 0:
        return [finite_or_none(v) for v in np.asarray(value).tolist()]
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    number = float(value)
    return number if math.isfinite(number) else None


def first_non_finite(tree: Any) -> str | None:
    """The path of the first floating leaf of ``tree`` with a NaN or inf (``None``: none)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
            return jax.tree_util.keystr(path, simple=True, separator="/")
    return None


def check_finite(tree: Any, what: str, advice: str) -> None:
    """Refuses, in one line, a pytree with a non-finite value (a teacher, a saved state).

    Raises:
      DDJaxError: ``'<what> has non-finite values (in <leaf>); <advice>'``.
    """
    leaf = first_non_finite(tree)
    if leaf is not None:
        raise DDJaxError(f"{what} has non-finite values (NaN or inf, in {leaf}); {advice}")


def per_model(values: Sequence[Any]) -> list[int]:
    """Host ints of a per-model counter (a pool's ``(K,)`` or one model's scalar)."""
    return [int(v) for v in np.atleast_1d(np.asarray(values))]
