"""Orbax checkpoints: one small wrapper so every stage saves and restores the same way.

Two uses:

* :func:`save_tree` / :func:`load_tree`: one pytree in one directory (an expert's whole
  trajectory with a leading epoch axis, a trained teacher). Orbax writes into a temporary
  directory and renames it when complete, so a killed save never leaves a directory that looks
  finished; :func:`exists` tells complete from absent.
* :class:`Checkpoints`: numbered checkpoints of a training state every K steps, the last n kept
  (Orbax ``CheckpointManager`` with ``StandardSave``), restored into the structure, dtypes and
  shardings of a template state, so a restarted run continues exactly where the last complete
  checkpoint left it.

Restores always go through an abstract tree (``jax.ShapeDtypeStruct`` with a sharding), which
places every array where the template's lives -- on one device, or sharded over a mesh.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ddjax import distributed
from ddjax.errors import DDJaxError, check

__all__ = ["Checkpoints", "abstract_like", "exists", "load_tree", "save_tree"]


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


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete (committed) checkpoint written by :func:`save_tree`."""
    path = Path(path)
    return path.is_dir() and (path / "_CHECKPOINT_METADATA").exists()


def save_tree(path: str | os.PathLike, tree: Any) -> Path:
    """Saves ``tree`` to the directory ``path`` (replacing an existing checkpoint there).

    The write is atomic: Orbax writes a temporary directory and renames it at the end.
    """
    path = Path(path).absolute()
    checkpointer = ocp.StandardCheckpointer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpointer.save(path, _savable(tree), force=True)
        checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def load_tree(path: str | os.PathLike, like: Any) -> Any:
    """Restores the checkpoint at ``path`` into the structure, dtypes and shardings of ``like``.

    ``like`` may hold arrays or ``jax.ShapeDtypeStruct``s (see :func:`abstract_like`).

    Raises:
      DDJaxError: if ``path`` is not a complete checkpoint or does not fit ``like``.
    """
    path = Path(path).absolute()
    check(exists(path), f"{path} is not a complete checkpoint (missing or half-written)")
    abstract = like if _is_abstract(like) else abstract_like(like)
    checkpointer = ocp.StandardCheckpointer()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return checkpointer.restore(path, abstract)
    except (ValueError, KeyError, TypeError) as e:
        raise DDJaxError(f"checkpoint {path} does not match the expected structure: {e}") from None
    finally:
        checkpointer.close()


class Checkpoints:
    """Numbered checkpoints of a state in ``directory``, keeping the last ``keep``.

    Args:
      directory: where step directories ``<step>/`` are written (created).
      keep: how many of the newest checkpoints to keep (``None``: all).
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 2):
        check(keep is None or keep >= 1, f"checkpoint keep={keep} must be at least 1")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Saves ``state`` as checkpoint ``step`` (synchronously; atomic)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._manager.save(step, args=ocp.args.StandardSave(_savable(state)), force=True)
            self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """Checkpoint ``step`` restored into the structure, dtypes and shardings of ``like``."""
        abstract = like if _is_abstract(like) else abstract_like(like)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError) as e:
            raise DDJaxError(
                f"checkpoint {self.directory / str(step)} does not match the run's state: {e}"
            ) from None

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_abstract(tree: Any) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
