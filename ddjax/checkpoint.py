"""Orbax checkpoints: one small wrapper so every stage saves and restores the same way.

Two uses:

* :func:`save_tree` / :func:`load_tree`: one pytree in one directory (an expert's whole
  trajectory with a leading epoch axis, a trained teacher). The tree is written into a hidden
  sibling directory that is renamed into place when complete, so a killed save never leaves a
  directory that looks finished; :func:`exists` tells complete from absent.
* :class:`Checkpoints`: numbered checkpoints of a training state every K steps, the last n kept
  (Orbax ``CheckpointManager`` with ``StandardSave``), restored into the structure, dtypes and
  shardings of a template state, so a restarted run continues exactly where the last complete
  checkpoint left it. Old steps are renamed out of the way before they are deleted
  (``todelete_subdir``), so a kill during a deletion never leaves a half-deleted step that a
  resumed run could read.

**Damage.** Every checkpoint records the size and SHA-256 of each of its files
(``ddjax_files.json``, :data:`MANIFEST`) when it is saved, and every load checks them first:
Orbax and TensorStore read a bit-flipped data file without noticing (the values are silently
wrong), and a missing or truncated one fails deep inside asynchronous code with a traceback of
150 lines. A damaged checkpoint is instead one line (:class:`~ddjax.errors.DDJaxError`) naming
the file and what to do. Hashing costs about what restoring does: for a CIFAR-10 ConvNet
expert trajectory (51 snapshots, 60 MB on disk) 0.31 s of SHA-256 beside a 0.38 s restore,
measured on a busy 2-core CPU (SHA-256 at 280 MB/s there; CPUs with SHA extensions hash
several times faster). A directory is hashed once per process while its files keep their size
and modification time (later loads cost a ``stat`` per file). A checkpoint written before
ddjax recorded hashes is read without that check, Orbax's errors still turned into one line.

Restores always go through an abstract tree (``jax.ShapeDtypeStruct`` with a sharding), which
places every array where the template's lives -- on one device, or sharded over a mesh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ddjax import distributed, loop
from ddjax.errors import DDJaxError, check

__all__ = [
    "MANIFEST",
    "Checkpoints",
    "abstract_like",
    "exists",
    "load_tree",
    "save_tree",
    "verify",
]

#: The file, inside a checkpoint directory, that records each file's size and SHA-256.
MANIFEST = "ddjax_files.json"
#: Where :class:`Checkpoints` renames a step before deleting it (Orbax's ``todelete_subdir``).
_DELETING = ".deleting"
#: Checkpoint directories found intact in this process: path -> the files' (size, mtime).
_verified: dict[Path, tuple] = {}


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with the leaves' shardings) for restoring into ``tree``."""
    default = jax.sharding.SingleDeviceSharding(distributed.local_device())

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        if not isinstance(x, jax.Array):
            x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or default)

    return jax.tree.map(leaf, tree)


def _savable(tree: Any) -> Any:
    """``tree`` as Orbax saves it in a multi-process run: host-local arrays as NumPy.

    Orbax saves global arrays shard by shard from the processes that hold them; an array on
    one process's own device (a model every process trains alike, the squeeze teacher) is not
    global, so it is saved as NumPy, which Orbax writes once, from process 0.
    """
    if jax.process_count() == 1:
        return tree
    local = lambda x: isinstance(x, jax.Array) and x.is_fully_addressable  # noqa: E731
    return jax.tree.map(lambda x: np.asarray(x) if local(x) else x, tree)


# --------------------------------------------------------------------------------------------
# The manifest: sizes and SHA-256s recorded at save time, checked before every load
# --------------------------------------------------------------------------------------------


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(path: Path) -> None:
    """Records the size and SHA-256 of every file of the checkpoint ``path`` (process 0)."""
    files = {str(f.relative_to(path)): [f.stat().st_size, _sha256(f)] for f in _files(path)}
    # Not loop.atomic_write_json: this runs in process 0 alone (no barrier to meet).
    tmp = path / (MANIFEST + loop.TMP_SUFFIX)
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
    os.replace(tmp, path / MANIFEST)


def verify(path: str | os.PathLike, *, remedy: str) -> None:
    """Checks that ``path`` is a complete, undamaged checkpoint; one line when it is not.

    Every file recorded in its manifest must be present, of the recorded size and of the
    recorded SHA-256. A checkpoint without a manifest (written before ddjax recorded one) is
    only checked for completeness and readable metadata.

    Args:
      path: a checkpoint directory (:func:`save_tree`'s, or a step of :class:`Checkpoints`).
      remedy: what the user should do about a damaged one, e.g. ``'remove it and re-run
        ddjax experts'``; ends the message.

    Raises:
      DDJaxError: ``'checkpoint <path> is damaged: <file> <problem>; <remedy>'``.
    """
    path = Path(path).absolute()

    def damaged(problem: str) -> DDJaxError:
        return DDJaxError(f"checkpoint {path} is damaged: {problem}; {remedy}")

    if not exists(path):
        raise DDJaxError(f"{path} is not a complete checkpoint (missing or half-written); {remedy}")
    manifest = path / MANIFEST
    if not manifest.exists():  # written before manifests: the metadata at least must parse
        for name in ("_CHECKPOINT_METADATA", "_METADATA", "default/_METADATA"):
            if (path / name).is_file():
                try:
                    json.loads((path / name).read_bytes())
                except (OSError, ValueError) as e:
                    raise damaged(f"{name} cannot be read ({e})") from None
        return
    try:
        recorded = json.loads(manifest.read_bytes())["files"]
        check(isinstance(recorded, dict), "not a dict")
    except (OSError, ValueError, KeyError, TypeError, DDJaxError) as e:
        raise damaged(f"{MANIFEST} cannot be read ({e})") from None
    stats = []
    for name, (size, _) in sorted(recorded.items()):
        file = path / name
        if not file.is_file():
            raise damaged(f"{name} is missing")
        stat = file.stat()
        if stat.st_size != size:
            raise damaged(f"{name} has {stat.st_size} bytes, {size} were saved")
        stats.append((name, stat.st_size, stat.st_mtime_ns))
    if _verified.get(path) == tuple(stats):
        return  # hashed before in this process, and no file changed since
    for name, (_, sha256) in sorted(recorded.items()):
        if _sha256(path / name) != sha256:
            raise damaged(f"{name} does not match the SHA-256 recorded when it was saved")
    _verified[path] = tuple(stats)


@contextlib.contextmanager
def _orbax_errors(path: Path, remedy: str, mismatch: str) -> Iterator[None]:
    """Orbax's failures as one line; its abandoned reads kept off stderr.

    When one array of a restore fails, Orbax raises from one ``asyncio`` read; the other
    reads' coroutines are abandoned with their own errors, and when Python collects them (at
    exit, after the one-line error) it reports each on stderr ("Exception ignored in:
    <coroutine ...>", 60+ lines). After a failure those reports are dropped
    (:func:`_drop_orbax_reports`). ``mismatch`` names what a checkpoint of another
    structure fails to match.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except DDJaxError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        _drop_orbax_reports()
        raise DDJaxError(f"checkpoint {path} does not match {mismatch}: {_first_line(e)}") from None
    except Exception as e:  # TensorStore's read errors are plain Exceptions
        _drop_orbax_reports()
        raise DDJaxError(f"checkpoint {path} cannot be read ({_first_line(e)}); {remedy}") from None


def _drop_orbax_reports() -> None:
    """From now on, Python's reports of Orbax's abandoned coroutines are dropped.

    Only those: every other unraisable error still goes to the hook that was installed.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_reports", False):
        return

    def hook(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    hook.drops_orbax_reports = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Task exception was never retrieved"


def _first_line(error: BaseException) -> str:
    # TensorStore appends the whole spec of the store ("See full TensorStore details: ...").
    text = str(error).split(" See full TensorStore details")[0].strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# --------------------------------------------------------------------------------------------
# One tree in one directory
# --------------------------------------------------------------------------------------------


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete (committed) checkpoint written by :func:`save_tree`."""
    path = Path(path)
    return path.is_dir() and (path / "_CHECKPOINT_METADATA").exists()


def save_tree(path: str | os.PathLike, tree: Any) -> Path:
    """Saves ``tree`` to the directory ``path`` (replacing an existing checkpoint there).

    The write is atomic: the checkpoint and its manifest are written into a hidden sibling
    directory, which replaces ``path`` by renames once complete (an old ``path`` is renamed
    away before it is deleted). A kill leaves the old checkpoint, the new one or none.
    """

    def write(staging: Path) -> None:
        checkpointer = ocp.StandardCheckpointer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpointer.save(staging, _savable(tree), force=True)
            checkpointer.wait_until_finished()
        checkpointer.close()

    return replace_directory(path, write, finish=_write_manifest)


def replace_directory(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Writes the directory ``path`` whole: a kill leaves the old one, the new one or none.

    ``write(staging)`` fills a hidden sibling directory (in every process of a multi-process
    run: Orbax saves together); ``finish(staging)`` then runs on process 0, which renames the
    sibling into place -- an old ``path`` is renamed away first and deleted after. Leftovers
    of killed writes are removed first. (:func:`save_tree`; teachers, which add a file.)

    Returns:
      ``path``, absolute.
    """
    path = Path(path).absolute()
    pid = distributed.shared_pid()  # every process of a multi-process run writes together
    staging = path.parent / f".{path.name}.writing-{pid}"
    retired = path.parent / f".{path.name}.replaced-{pid}"

    def clear():
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in path.parent.glob(f".{path.name}.*-*"):  # of killed saves
            if leftover.name.startswith((f".{path.name}.writing-", f".{path.name}.replaced-")):
                shutil.rmtree(leftover)

    def swap():
        if finish is not None:
            finish(staging)
        if path.exists():
            os.replace(path, retired)
        os.replace(staging, path)
        if retired.exists():
            shutil.rmtree(retired)

    distributed.on_primary(f"stage {staging}", clear)
    write(staging)
    distributed.on_primary(f"replace {path}", swap)
    return path


def load_tree(path: str | os.PathLike, like: Any, *, remedy: str) -> Any:
    """Restores the checkpoint at ``path`` into the structure, dtypes and shardings of ``like``.

    ``like`` may hold arrays or ``jax.ShapeDtypeStruct``s (see :func:`abstract_like`).

    Args:
      path: the directory :func:`save_tree` wrote.
      like: the tree to restore into.
      remedy: what to do when the checkpoint is damaged (see :func:`verify`).

    Raises:
      DDJaxError: if ``path`` is not a complete checkpoint, is damaged (:func:`verify`) or
        does not fit ``like``.
    """
    path = Path(path).absolute()
    verify(path, remedy=remedy)
    abstract = like if _is_abstract(like) else abstract_like(like)
    checkpointer = ocp.StandardCheckpointer()
    try:
        with _orbax_errors(path, remedy, "the expected structure"):
            _check_shapes(path, checkpointer.metadata(path).item_metadata, abstract, remedy)
            return checkpointer.restore(path, abstract)
    finally:
        checkpointer.close()


def _check_shapes(path: Path, saved: Any, abstract: Any, remedy: str) -> None:
    """Refuses a tree of dicts whose leaves or shapes differ from the saved ones, before
    Orbax reads anything: Orbax fails on the first such array from inside its asynchronous
    reads, and the others' failures still reach stderr at exit."""
    saved_leaves = jax.tree_util.tree_leaves_with_path(saved)
    wanted_leaves = jax.tree_util.tree_leaves_with_path(abstract)
    by_dict_keys = all(
        isinstance(k, jax.tree_util.DictKey)
        for leaf_path, _ in saved_leaves + wanted_leaves
        for k in leaf_path
    )
    if not by_dict_keys:  # other containers are named differently in Orbax's metadata
        return
    keystr = jax.tree_util.keystr
    saved_shapes = {keystr(k): tuple(getattr(v, "shape", ())) for k, v in saved_leaves}
    where = f"checkpoint {path} does not match the expected structure"
    for key, leaf in wanted_leaves:
        name = keystr(key)
        if name not in saved_shapes:
            raise DDJaxError(f"{where}: it has no {name}; {remedy}")
        if saved_shapes[name] != tuple(leaf.shape):
            raise DDJaxError(
                f"{where}: {name} has shape {saved_shapes[name]}, expected {tuple(leaf.shape)}; "
                f"{remedy}"
            )


# --------------------------------------------------------------------------------------------
# Numbered checkpoints of a training state
# --------------------------------------------------------------------------------------------


class Checkpoints:
    """Numbered checkpoints of a state in ``directory``, keeping the last ``keep``.

    Each step directory gets a manifest (:func:`verify`) once Orbax has committed it, and
    :meth:`restore` checks it first. Deleted steps are renamed into ``directory/.deleting``
    first and removed from there, and so are the temporary directories of killed saves when
    the directory is opened: neither can be taken for a step.

    Args:
      directory: where step directories ``<step>/`` are written (created).
      keep: how many of the newest checkpoints to keep (``None``: all).
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 2):
        check(keep is None or keep >= 1, f"checkpoint keep={keep} must be at least 1")
        self.directory = Path(directory).absolute()
        distributed.on_primary(f"clean {self.directory}", self._remove_leftovers)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,
            create=True,
            todelete_subdir=_DELETING,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _remove_leftovers(self) -> None:
        """Removes what a kill can leave: renamed-for-deletion steps, uncommitted saves."""
        if not self.directory.is_dir():
            return
        for entry in self.directory.iterdir():
            if entry.name == _DELETING or ".orbax-checkpoint-tmp" in entry.name:
                shutil.rmtree(entry)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> Path:
        """The directory of checkpoint ``step``."""
        return self.directory / str(step)

    def save(self, step: int, state: Any) -> None:
        """Saves ``state`` as checkpoint ``step`` (synchronously; atomic)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._manager.save(step, args=ocp.args.StandardSave(_savable(state)), force=True)
            self._manager.wait_until_finished()

        def finish():
            _write_manifest(self.step_dir(step))
            shutil.rmtree(self.directory / _DELETING, ignore_errors=True)

        distributed.on_primary(f"manifest {self.step_dir(step)}", finish)

    def restore(self, step: int, like: Any) -> Any:
        """Checkpoint ``step`` restored into the structure, dtypes and shardings of ``like``.

        Raises:
          DDJaxError: a damaged checkpoint (naming the file and the step directory to remove)
            or one that does not fit ``like``.
        """
        older = [s for s in self.all_steps() if s < step]
        remedy = (
            f"remove {self.step_dir(step)} so that the previous checkpoint (step {max(older)}) "
            "is used"
            if older
            else f"remove {self.step_dir(step)} to start the run again from the beginning"
        )
        verify(self.step_dir(step), remedy=remedy)
        abstract = like if _is_abstract(like) else abstract_like(like)
        with _orbax_errors(self.step_dir(step), remedy, "the run's state"):
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_abstract(tree: Any) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
