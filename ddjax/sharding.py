"""Device meshes and array placement.

ddjax decides shardings once, at the top of a stage, and lets ``jit`` propagate
them (the big_vision pattern). The mesh has two axes:

* ``pool``: independent models trained side by side (evaluation seeds,
  experts). Each device holds whole models; nothing is communicated.
* ``data``: the examples of one batch (the inner-loop minibatch of trajectory
  matching, the recover batch of SRe2L).

Axes are ``AxisType.Auto`` (classic GSPMD propagation): ``jax.make_mesh``
creates *Explicit* axes by default since JAX 0.10, which would make every
sharding part of the array type and need annotations inside the model code.
``pmap`` is not used anywhere (it is legacy since JAX 0.8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddjax.errors import check


def make_mesh(pool: int = 1, data: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``('pool', 'data')`` mesh over ``pool * data`` devices.

    Args:
      pool: size of the model-pool axis.
      data: size of the batch axis.
      devices: devices to use (default: the first ``pool * data`` of ``jax.devices()``).
    """
    devices = list(devices if devices is not None else jax.devices())
    check(
        pool * data <= len(devices),
        f"mesh pool={pool} x data={data} needs {pool * data} devices, only {len(devices)} exist",
    )
    return jax.make_mesh(
        (pool, data),
        ("pool", "data"),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[: pool * data],
    )


def pool_mesh(num_models: int) -> Mesh:
    """A mesh whose ``pool`` axis spreads ``num_models`` models evenly over the devices.

    The pool axis gets the largest device count that divides ``num_models``, so
    every device trains the same number of whole models (5 models on 8 devices
    use 5 devices; 8 models use all 8). In a multi-process run every process must
    hold the same number of models (:func:`even_devices`); when ``num_models`` cannot
    be split so, the pool is replicated on every device (``pool=1``).
    """
    devices = even_devices(num_models)
    if devices is None:
        return make_mesh(pool=1, data=jax.device_count())
    return make_mesh(pool=len(devices), data=1, devices=devices)


def even_devices(items: int) -> list[jax.Device] | None:
    """The most devices that can share ``items`` equal parts, the same number per process.

    In one process: the first ``d`` devices, ``d`` the largest device count that divides
    ``items``. With ``P`` processes: the first ``d`` local devices of every process (process
    by process), ``d * P`` dividing ``items``; ``None`` when no such ``d`` exists (e.g. 5 models
    on 2 processes) -- the caller then replicates rather than leave a process without work.
    """
    processes = jax.process_count()
    per_process = [
        d for d in range(1, jax.local_device_count() + 1) if items % (d * processes) == 0
    ]
    if not per_process:
        return None
    count = max(per_process)
    by_process: dict[int, list[jax.Device]] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    return [d for p in sorted(by_process) for d in by_process[p][:count]]


def pool_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``pool``; the rest replicated."""
    return NamedSharding(mesh, P("pool"))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def shard_pool(tree, mesh: Mesh):
    """Places a pytree whose leaves have a leading model axis on the ``pool`` axis."""
    return put(tree, pool_sharding(mesh))


def replicate(tree, mesh: Mesh):
    """Places a pytree on every device of ``mesh``."""
    return put(tree, replicated(mesh))


def shard_batch(tree, mesh: Mesh):
    """Places a batch (leaves with a leading example axis) split over ``mesh``'s ``data`` axis.

    A batch whose size the ``data`` axis does not divide (an epoch's smaller last batch) is
    replicated instead: every device computes all of it, which gives the same numbers (jit on
    global arrays computes whole-batch statistics either way) without padding or dropping
    examples.
    """
    parts = mesh.shape["data"]
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(tree)}
    if parts > 1 and all(size % parts == 0 for size in sizes):
        return put(tree, NamedSharding(mesh, P("data")))
    return replicate(tree, mesh)


def put(tree, where):
    """``jax.device_put(tree, where)`` that also places host values on other processes' devices.

    ``where`` is one sharding or a tree of them. ``jax.device_put`` only places host values
    on this process's devices; for a sharding that spans processes every process holds the
    whole value (the same in all), and each builds its own shards from it
    (``jax.make_array_from_callback``). Arrays already spread over processes are resharded
    by ``jax.device_put``.
    """
    if isinstance(where, jax.sharding.Sharding):
        if where.is_fully_addressable:
            return jax.device_put(tree, where)
        return jax.tree.map(lambda x: _put_global(x, where), tree)
    return jax.tree.map(put, tree, where)


def _put_global(x, where: jax.sharding.Sharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, where)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_global(jax.random.key_data(x), where)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, where, lambda index: host[index])


def describe(mesh: Mesh) -> str:
    """One line for logs: ``pool=4 data=2 on 8 cpu devices``."""
    sizes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    platform = mesh.devices.flat[0].platform
    return f"{sizes} on {math.prod(mesh.devices.shape)} {platform} devices"
