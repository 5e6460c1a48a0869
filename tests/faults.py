"""Tools of the fault-matrix tests (``tests/test_faults_*.py``): run a stage, check a refusal.

A refusal is what the README promises for bad input: exit code 2, exactly one line on stderr
(``ddjax: error: ...``) naming what is wrong, no traceback, and nothing written -- a work
directory that did not exist still does not, and every file of the watched paths (an existing
work directory, the inputs) is byte for byte what it was.

The stages run in this process (``ddjax.cli.main``), which is what the ``ddjax`` command runs,
so a case costs only its own work, not a JAX import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from ddjax import cli

#: A small generated dataset the stages accept as ``--config.dataset.name``.
DATA = "synthetic:classes=3,size=8,channels=1,train=24,test=12,seed=1"


def files(path: str | Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) -> its SHA-256; ``{}`` when missing."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def run(argv: Sequence[str], capsys) -> tuple[int, str, str]:
    """``ddjax ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def workdir_of(argv: Sequence[str]) -> Path | None:
    argv = [str(a) for a in argv]
    return Path(argv[argv.index("--workdir") + 1]) if "--workdir" in argv else None


def refused(argv: Sequence[str], capsys, message: str, *, watch: Iterable[str | Path] = ()) -> str:
    """Runs ``ddjax ARGV`` and asserts a clean refusal whose line contains ``message``.

    Args:
      argv: the command line after ``ddjax``.
      capsys: pytest's fixture.
      message: a part of the expected error line.
      watch: paths (files or folders) that must be unchanged; the work directory always is.

    Returns:
      The error line.
    """
    workdir = workdir_of(argv)
    watched = [Path(p) for p in watch] + ([workdir] if workdir is not None else [])
    before = {p: files(p) for p in watched}
    existed = workdir is not None and workdir.exists()
    code, out, err = run(argv, capsys)
    assert code == 2, f"exit {code}, expected 2; stderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddjax: error: "), f"not one line:\n{err}"
    assert message in lines[0], f"{message!r} not in {lines[0]!r}"
    if workdir is not None and not existed:
        assert not workdir.exists(), f"{workdir} was created: {sorted(files(workdir))}"
    for path in watched:
        assert files(path) == before[path], f"{path} changed"
    return lines[0]
