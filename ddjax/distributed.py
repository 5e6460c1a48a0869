"""Multi-process runs: ``jax.distributed`` set-up and the rules for who writes what.

A stage runs the same program in every process (SPMD). What differs between processes:

* **Writing.** Only process 0 writes shared outputs (``config.json``, ``metrics.jsonl``,
  ``results.json``, pictures, synthetic sets, expert trajectories, label stores). Every
  writer in ddjax goes through :func:`ddjax.loop.atomic_file` (and :class:`ddjax.workdir.Workdir`),
  which waits for all processes, lets process 0 write, and waits again -- so a file any
  process reads afterwards is complete, and nothing is written twice or half.
* **Checkpoints.** Orbax checkpoints are saved and restored by *all* processes together
  (Orbax coordinates them; each process writes the shards it holds).
* **Devices.** Meshes span ``jax.devices()``, every process's devices; host-local work uses
  ``jax.local_devices()``. Global arrays are assembled from process-local data with
  ``jax.make_array_from_process_local_data`` and brought back with :func:`to_host`.

Everything here is also correct, and free, in a single process.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ddjax.errors import DDJaxError, check


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process run (the CLI's ``--coordinator`` flags).

    Attributes:
      coordinator: ``HOST:PORT`` of process 0's coordination service, ``'auto'`` for the
        cluster auto-detection of ``jax.distributed.initialize()`` (SLURM, Open MPI, Kubernetes,
        Cloud TPU, or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
        ``JAX_PROCESS_ID`` environment), or ``None`` for a single-process run.
      num_processes: the number of processes (``None``: detected).
      process_id: this process's index in ``[0, num_processes)`` (``None``: detected).
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        if self.coordinator is None:
            check(
                self.num_processes is None and self.process_id is None,
                "--num_processes/--process_id need --coordinator HOST:PORT (or --coordinator "
                "auto for cluster auto-detection)",
            )
            return
        check(
            self.coordinator == "auto" or re.fullmatch(r"\[?[\w.:-]+\]?:\d+", self.coordinator),
            f"--coordinator must be HOST:PORT (e.g. 127.0.0.1:12355) or 'auto', "
            f"got {self.coordinator!r}",
        )
        if self.coordinator != "auto":
            check(
                self.num_processes is not None and self.process_id is not None,
                "--coordinator HOST:PORT needs --num_processes P and --process_id I",
            )
        if self.num_processes is not None:
            check(
                self.num_processes >= 1, f"--num_processes must be >= 1, got {self.num_processes}"
            )
        if self.process_id is not None:
            limit = self.num_processes
            check(
                self.process_id >= 0 and (limit is None or self.process_id < limit),
                f"--process_id must be in [0, {limit}), got {self.process_id}"
                if limit is not None
                else f"--process_id must be >= 0, got {self.process_id}",
            )

    @property
    def multi_process(self) -> bool:
        return self.coordinator is not None


def initialize(launch: Launch) -> None:
    """Joins the run described by ``launch`` (before any JAX computation); no-op without one.

    Raises:
      DDJaxError: when JAX cannot join (no coordinator reachable, no cluster detected).
    """
    if not launch.multi_process:
        return
    kwargs: dict[str, Any] = {}
    if launch.coordinator != "auto":
        kwargs["coordinator_address"] = launch.coordinator
    if launch.num_processes is not None:
        kwargs["num_processes"] = launch.num_processes
    if launch.process_id is not None:
        kwargs["process_id"] = launch.process_id
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DDJaxError(
            f"could not join the multi-process run ({kwargs or 'auto'}): {first}"
        ) from None


def is_primary() -> bool:
    """Whether this process writes shared outputs (process 0; always true in one process)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (free in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree(value: Any, what: str) -> None:
    """Checks that every process holds the same small value (a config, a count).

    Raises:
      DDJaxError: naming ``what`` when the processes disagree.
    """
    if jax.process_count() == 1:
        return
    try:
        multihost_utils.assert_equal(np.asarray(value), f"processes disagree on {what}")
    except AssertionError as e:
        raise DDJaxError(str(e).splitlines()[0]) from None


def to_host(tree: Any) -> Any:
    """NumPy copies of ``tree``'s arrays, gathered from all processes when they span several.

    A fully addressable array is copied as it is; an array sharded over other processes'
    devices is all-gathered first (every process must call this together).
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def local_device() -> jax.Device:
    """This process's first device: where host-local work (loading, one-model steps) runs."""
    return jax.local_devices()[0]


def on_primary(name: str, action: Callable[[], Any]) -> None:
    """Runs ``action`` (a file operation: remove, rename) in process 0 only, between barriers.

    Every process calls this at the same point; when it returns, the action is done for all.
    """
    sync(f"before {name}")
    if is_primary():
        action()
    sync(f"after {name}")


def shared_pid() -> int:
    """Process 0's pid in every process: a name part that all processes agree on."""
    pid = np.int64(os.getpid())
    if jax.process_count() == 1:
        return int(pid)
    return int(multihost_utils.broadcast_one_to_all(pid))
