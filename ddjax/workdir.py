"""A run's work directory: resolved config, metrics, results, pictures.

Layout (every stage)::

    WORKDIR/config.json     the resolved config (checked on resume)
    WORKDIR/metrics.jsonl   one JSON object per logged event
    WORKDIR/results.json    the stage's final numbers (rewritten atomically)

Re-running a stage on the same work directory with the same config resumes;
with a different config it is refused, naming the fields that differ, so that
results of two configs never mix.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from ddjax import config as config_lib
from ddjax import distributed, loop
from ddjax.errors import DDJaxError


class Workdir:
    """Files of one run.

    Args:
      path: the directory (created if missing).
      config: the resolved config; compared with a saved ``config.json``.
      stage: the stage name, stored beside the config.
    """

    def __init__(self, path: str | os.PathLike, config: ml_collections.ConfigDict, stage: str):
        self.path = Path(path)
        check_path(self.path)
        saved_file = self.path / "config.json"
        current = {"stage": stage, **json.loads(config_lib.to_json(config))}
        if saved_file.exists():
            saved = loop.read_json(saved_file, what=f"the work directory {self.path}")
            changed = config_lib.diff(saved, current)
            if changed:
                raise DDJaxError(
                    f"workdir {self.path} holds a run with a different config "
                    f"({'; '.join(changed[:3])}); use a new --workdir or the same config"
                )
            self.resumed = True
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(saved_file, current)
            self.resumed = False

    def file(self, name: str) -> Path:
        return self.path / name

    def log(self, **record: Any) -> None:
        """Appends one event to ``metrics.jsonl`` (with a wall-clock timestamp; process 0 only).

        Strict JSON, as ``results.json``: a NaN or inf raises ``ValueError`` (log ``None``
        for a number that does not exist: :func:`ddjax.guard.finite_or_none`).
        """
        if not distributed.is_primary():
            return
        record = {"time": round(time.time(), 3), **record}
        line = json.dumps(record, default=float, allow_nan=False)
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(line + "\n")

    def rewind(
        self,
        to: int | tuple | None,
        *,
        key: str | tuple[str, ...] = "iteration",
        where: Mapping[str, Any] | None = None,
        keep: Collection[str] = (),
        since: str | None = None,
    ) -> int:
        """Drops from ``metrics.jsonl`` the events logged after the state a resumed run restored.

        A resumed stage redoes (and logs again) the work a kill lost since its last checkpoint;
        called where it restores its state, before it logs anything, this keeps every event in
        the file once. Events are positioned by ``key``: an event at ``key > to`` came after
        the restored state and is dropped. A line cut by a kill is dropped too.

        Args:
          to: the restored position (``key``'s value in the state, e.g. the checkpoint's
            iteration); ``None`` when nothing was restored: every event considered is dropped.
          key: the field(s) positioning an event (a tuple compares as a tuple, e.g.
            ``('batch', 'iteration')``). Events without it were logged before the first step
            (an initialisation) and are kept unless ``to`` is ``None``.
          where: consider only events whose fields equal these (e.g. one expert group's);
            others are kept.
          keep: event names kept whatever their position: work whose result the run keeps
            in ``results.json`` and does not redo (distill's evaluations).
          since: consider only events after the last one of this name (``'inputs_changed'``:
            what was logged for an earlier input is history, not redone work).

        Returns:
          The number of lines dropped.
        """
        file = self.path / "metrics.jsonl"
        if not file.is_file():
            return 0
        fields = (key,) if isinstance(key, str) else tuple(key)
        where = dict(where or {})

        def later(record: dict) -> bool:
            if any(record.get(k) != v for k, v in where.items()) or record.get("event") in keep:
                return False
            if to is None:
                return True
            if any(f not in record for f in fields):
                return False
            position = tuple(record[f] for f in fields)
            return position > (tuple(to) if isinstance(to, tuple) else (to,))

        lines = file.read_text().splitlines(keepends=True)
        records = []
        for line in lines:
            try:
                record = json.loads(line) if line.endswith("\n") else None
            except json.JSONDecodeError:  # cut by a kill
                record = None
            records.append(record if isinstance(record, dict) else None)
        first = 0
        if since is not None:
            marks = [i for i, r in enumerate(records) if r is not None and r.get("event") == since]
            first = marks[-1] + 1 if marks else 0
        kept = [
            line
            for i, (line, record) in enumerate(zip(lines, records, strict=True))
            if record is not None and (i < first or not later(record))
        ]
        if len(kept) < len(lines):
            loop.atomic_write_bytes(file, "".join(kept).encode())
        return len(lines) - len(kept)

    def results(self) -> dict:
        """The current ``results.json`` (empty when the run has none yet)."""
        file = self.path / "results.json"
        return json.loads(file.read_text()) if file.exists() else {}

    def save_results(self, results: dict) -> None:
        write_json(self.path / "results.json", results)


def check_path(path: str | os.PathLike) -> None:
    """Refuses, in one line, a work directory path that cannot be one (nothing is created).

    A path that is a file, lies under a file, or whose nearest existing folder cannot be
    written to.
    """
    path = Path(path).absolute()
    if path.exists():
        if not path.is_dir():
            raise DDJaxError(f"--workdir {path} is a file, not a directory; pass a directory")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DDJaxError(
            f"--workdir {path} lies under the file {parent}; pass a path under a directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DDJaxError(f"--workdir {path} cannot be created: {parent} is not writable")


def write_json(path: Path, data: Any) -> None:
    """Writes JSON atomically (temporary file + rename: :func:`ddjax.loop.atomic_write_json`)."""
    loop.atomic_write_json(path, data)
