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
