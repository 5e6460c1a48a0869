"""Small helpers for the iteration-driven stages (recover; distill): the driver's side effects.

A stage's jitted step is pure; its Python driver does the periodic work around it. These are
the pieces every such driver repeats, each written once here:

* :func:`every` and :class:`Periodic` -- "every ``n`` iterations, and at the last one";
* :func:`progress_bar` -- the one ``tqdm`` construction (silent when not a terminal, off
  when the caller passes ``progress=False``);
* :class:`KillSwitch` -- the test hook that makes a driver return as if the process had been
  killed, so that tests can check that a resumed run equals an uninterrupted one;
* :func:`atomic_write_bytes`, :func:`atomic_write_json`, :func:`atomic_savez`,
  :func:`atomic_save_npy` -- files written under a temporary name (``<name>.tmp`` beside the
  target) and renamed with ``os.replace``, so a reader or a resumed run never sees half a file;
  :func:`read_json` reads such a file back with a one-line error when it cannot.

Iterations are 1-based here, as in the drivers' logs (iteration ``t`` is the state after
``t`` steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm.auto import tqdm

from ddjax import distributed
from ddjax.errors import DDJaxError

__all__ = [
    "TMP_SUFFIX",
    "KillSwitch",
    "Periodic",
    "atomic_file",
    "atomic_save_npy",
    "atomic_savez",
    "atomic_write_bytes",
    "atomic_write_json",
    "every",
    "progress_bar",
    "read_json",
]

#: Suffix of the temporary file an atomic write renames into place. A process killed during
#: the write leaves ``<name>.tmp`` behind; the target itself is never partial.
TMP_SUFFIX = ".tmp"


# --------------------------------------------------------------------------------------------
# Periodic work
# --------------------------------------------------------------------------------------------


def every(period: int, iteration: int, *, last: int | None = None) -> bool:
    """Whether periodic work is due at ``iteration``: a multiple of ``period``, or ``last``.

    Args:
      period: the period in iterations; 0 (or negative) means never (but ``last`` still counts).
      iteration: the 1-based iteration just finished.
      last: also due at this iteration (typically the run's final one), whatever ``period``.

    Returns:
      ``iteration % period == 0 or iteration == last``.
    """
    return (period > 0 and iteration % period == 0) or (last is not None and iteration == last)


@dataclasses.dataclass(frozen=True)
class Periodic:
    """:func:`every` with its period and last iteration bound: ``Periodic(100, last=T)(t)``.

    Attributes:
      period: every this many iterations (0: never, except ``last``).
      last: also at this iteration (``None``: no extra one).
    """

    period: int
    last: int | None = None

    def __call__(self, iteration: int) -> bool:
        return every(self.period, iteration, last=self.last)


# --------------------------------------------------------------------------------------------
# Progress and the kill hook
# --------------------------------------------------------------------------------------------


def progress_bar(
    iterable: Iterable | None = None,
    *,
    progress: bool,
    desc: str,
    total: int | None = None,
    initial: int = 0,
    unit: str = "it",
    leave: bool = True,
) -> tqdm:
    """A ``tqdm`` bar, shown only when ``progress`` is true and stderr is a terminal.

    ``disable=None`` is tqdm's "off when not a TTY" (logs and CI stay clean); ``progress=False``
    turns it off everywhere.

    Args:
      iterable: what to iterate over (``None``: update the bar by hand).
      progress: the caller's switch.
      desc: the bar's label (the stage's name).
      total: the number of units (default: ``len(iterable)``).
      initial: units already done (a resumed run).
      unit: the unit's name.
      leave: keep the finished bar on screen.
    """
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        initial=initial,
        unit=unit,
        leave=leave,
        disable=None if progress else True,
    )


@dataclasses.dataclass
class KillSwitch:
    """For tests: make a driver return after ``after`` units of work, as if killed there.

    The driver calls :meth:`tick` after each unit of work it finished *in this call* (a batch,
    an iteration) and checks :attr:`fired` before starting the next; it then returns without
    writing its final output, like a process killed between two units. ``after=None`` (the
    default everywhere outside tests) never fires.

    Attributes:
      after: units of work after which to stop (``None``: never).
      done: units finished so far in this call.
    """

    after: int | None = None
    done: int = 0

    def tick(self, units: int = 1) -> None:
        """Counts finished units of work."""
        self.done += units

    @property
    def fired(self) -> bool:
        """Whether the driver should return now."""
        return self.after is not None and self.done >= self.after


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Opens ``<path>.tmp`` for binary writing and renames it to ``path`` when the block ends.

    If the block raises, the temporary file is removed and ``path`` is left as it was. In a
    multi-process run only process 0 writes: the others write into a discarded buffer, and all
    wait for each other before and after the write (:mod:`ddjax.distributed`).
    """
    path = Path(path)
    if not distributed.is_primary():
        # Another process writes the file (every process runs this same code): this one
        # waits until the file is complete, so what it reads next is what process 0 wrote.
        distributed.sync(f"write {path}")
        yield io.BytesIO()
        distributed.sync(f"written {path}")
        return
    distributed.sync(f"write {path}")
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            yield f
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    distributed.sync(f"written {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes ``data`` as indented JSON (``default=float`` for NumPy scalars) atomically.

    Strict JSON: a NaN or inf raises ``ValueError`` instead of writing a bare ``NaN`` token
    (a number that does not exist is ``None``; :func:`ddjax.guard.finite_or_none`).
    """
    text = json.dumps(data, indent=2, default=float, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> None:
    """``np.savez(path, **arrays)`` atomically (``path`` is used as given: no ``.npz`` added)."""
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def atomic_save_npy(path: str | os.PathLike, array: Any) -> None:
    """``np.save(path, array)`` atomically (``path`` is used as given: no ``.npy`` added)."""
    with atomic_file(path) as f:
        np.save(f, array)


def read_json(path: str | os.PathLike, *, what: str) -> Any:
    """Reads a JSON file, or raises one line saying that ``what`` is corrupt.

    Args:
      path: the file (it is expected to exist; check that first for a better message).
      what: what the file belongs to, for the message (``'the teacher'``).

    Raises:
      DDJaxError: ``'<path> cannot be read (<reason>); <what> is corrupt'``.
    """
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DDJaxError(f"{path} cannot be read ({e}); {what} is corrupt") from None
