"""Expert trajectories for trajectory matching, with forgetting statistics on the side.

MTT (Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022,
§3; ``buffer.py``) matches a student against *experts*: networks trained on the real data whose
parameters were saved at initialisation and after every epoch. This module trains them with
MTT's recipe (``research/trajectory_matching.md`` §1.4):

* ConvNet, SGD with lr 0.01, no momentum, no weight decay, no learning-rate decay;
* batch 256, DSA on every batch, cross-entropy, 50 epochs, 100 experts by default;
* the ``params`` at initialisation and after every epoch: ``epochs + 1`` snapshots;
* the test set is evaluated after every epoch (``test_every``), for the log only.

Plain SGD with a constant rate is deliberate: MTT's author found such trajectories "much easier
for our synthetic data to imitate" (MTT issue #8).

**Keys.** Expert ``i`` of seed ``s`` is initialised from ``init_key`` and trained with
``train_key``, where ``init_key, train_key = split(fold_in(key(s), i))``; epoch ``e`` shuffles
and augments with ``split(fold_in(train_key, e), 1)[0]``, the key :func:`ddjax.train.fit` gives
its one model. So expert ``i`` is exactly ``train.fit(init_state(model, tx, init_key), step,
x_train, y_train, train_key, epochs, batch_size)``, whichever experts it was trained beside
(``experts_at_once``) and however often the run was interrupted.

**Pools.** ``experts_at_once`` experts are trained side by side with the building blocks of
:mod:`ddjax.train`: one vmapped program on accelerators (the pool axis sharded over the devices
when there are several), one model after another on CPU (``pool_mode``, see
:func:`ddjax.train.resolve_pool_mode`).

**Forgetting events** (Toneva et al., "An Empirical Study of Example Forgetting during Deep
Neural Network Learning", ICLR 2019, §2): every time an example is in a minibatch, the train
step's own forward pass (on the augmented image, before the update) says whether it was
classified correctly; a *forgetting event* is correct at the previous presentation, incorrect
now. An epoch presents every example once, so an expert presents each example ``epochs``
times. Examples that are never classified correctly get the score ``epochs`` -- more than any
example that was learned can reach (at most ``epochs // 2`` events) -- so that, as in Toneva et
al. and SelMatch, unlearned examples rank as the most forgettable. No second forward pass is
made. SelMatch and the forgetting coreset reuse these scores.

**Files** (``out_dir``)::

    experts.json        settings, completed experts, per-epoch losses and test accuracies
    expert_0000/ ...    one Orbax checkpoint per expert: {'params': leaves [epochs + 1, ...]}
    forgetting.npz      per-expert forgetting counts [E_done, n_train] (train order) + sum/mean
    _partial/           the group in training: state, trajectory so far, forgetting state
                        (every ``checkpoint_every`` epochs; removed when the group completes)

A killed run continues with the group in ``_partial/`` from its last checkpoint, then with the
next unfinished experts, and gives bit-identical trajectories on CPU. Loading picks a subset
of experts (:func:`load_trajectories`), as MTT loads one buffer file at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax import augment as augment_lib
from ddjax import checkpoint, sharding, train
from ddjax import models as models_lib
from ddjax.data import Dataset
from ddjax.errors import DDJaxError, check
from ddjax.workdir import write_json

__all__ = [
    "ForgettingState",
    "TRAINING_FIELDS",
    "check_compatible",
    "check_settings",
    "completed",
    "expert_dir",
    "expert_keys",
    "epoch_key",
    "forgetting_counts",
    "forgetting_init",
    "forgetting_scores",
    "forgetting_update",
    "load_trajectories",
    "load_trajectory",
    "read_meta",
    "summary",
    "train_experts",
    "trajectory_shapes",
]

FORMAT = 1
META_FILE = "experts.json"
FORGETTING_FILE = "forgetting.npz"
PARTIAL_DIR = "_partial"

#: Fields of ``experts.json`` that decide the trajectories. A run resumed into an existing
#: directory must agree on all of them; the others (num_experts, experts_at_once, pool_mode,
#: test_every, test_limit, checkpoint_every) may change between runs.
TRAINING_FIELDS = (
    "dataset",
    "zca",
    "mean",
    "std",
    "image_shape",
    "num_classes",
    "num_train",
    "train_labels_sha256",
    "model",
    "model_overrides",
    "epochs",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "augment",
    "seed",
)

Params = Any
Log = Callable[..., None]


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def expert_keys(seed: int, index: int) -> tuple[jax.Array, jax.Array]:
    """``(init_key, train_key)`` of expert ``index``: a function of ``(seed, index)`` only."""
    init_key, train_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), index))
    return init_key, train_key


def epoch_key(train_key: jax.Array, epoch: int) -> jax.Array:
    """The key of epoch ``epoch`` (0-based): the one :func:`ddjax.train.fit` gives one model."""
    return jax.random.split(jax.random.fold_in(train_key, epoch), 1)[0]


# --------------------------------------------------------------------------------------------
# Forgetting events (Toneva et al. 2019)
# --------------------------------------------------------------------------------------------


class ForgettingState(NamedTuple):
    """Per-example forgetting bookkeeping; arrays of shape ``(..., num_examples)``.

    Attributes:
      previous: bool, correct at the latest presentation (false before the first).
      learned: bool, correct at some presentation so far.
      events: int32, forgetting events so far (correct -> incorrect transitions).
    """

    previous: np.ndarray
    learned: np.ndarray
    events: np.ndarray


def forgetting_init(shape: int | Sequence[int]) -> ForgettingState:
    """The state before the first presentation, e.g. ``forgetting_init((num_experts, n))``."""
    shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    return ForgettingState(np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, np.int32))


def forgetting_update(state: ForgettingState, correct: np.ndarray) -> ForgettingState:
    """Records one presentation of every example (``correct``: bool, same shape as the state)."""
    correct = np.asarray(correct, bool)
    forgotten = state.previous & ~correct
    return ForgettingState(
        previous=correct,
        learned=state.learned | correct,
        events=state.events + forgotten.astype(np.int32),
    )


def forgetting_counts(state: ForgettingState, presentations: int) -> np.ndarray:
    """Forgetting counts: the events, or ``presentations`` for never-learned examples (int32)."""
    return np.where(state.learned, state.events, np.int32(presentations)).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Settings and metadata
# --------------------------------------------------------------------------------------------


def check_settings(
    dataset: Dataset,
    *,
    model: str,
    model_overrides: dict | None,
    num_experts: int,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    augment: str,
    seed: int,
    pool_mode: str,
    experts_at_once: int,
    test_every: int,
    test_limit: int | None,
    checkpoint_every: int,
) -> nn.Module:
    """Validates the settings of :func:`train_experts`; returns the Flax model.

    Raises:
      DDJaxError: naming the first bad field, its value and what would be valid.
    """
    for field, value in (
        ("num_experts", num_experts),
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("experts_at_once", experts_at_once),
        ("test_every", test_every),
        ("checkpoint_every", checkpoint_every),
    ):
        _check_int(field, value, 1)
    if test_limit is not None:
        _check_int("test_limit", test_limit, 1)
    _check_int("seed", seed, 0)
    check(
        isinstance(lr, int | float) and math.isfinite(lr) and lr > 0,
        f"lr={lr!r} must be a positive number (MTT: 0.01)",
    )
    check(
        isinstance(momentum, int | float) and 0 <= momentum < 1,
        f"momentum={momentum!r} must be in [0, 1) (MTT: 0)",
    )
    check(
        isinstance(weight_decay, int | float) and weight_decay >= 0,
        f"weight_decay={weight_decay!r} must be >= 0 (MTT: 0)",
    )
    augment_lib.make_augment(augment)
    train.resolve_pool_mode(pool_mode)
    check(
        isinstance(model_overrides, dict | type(None)),
        f"model_overrides must be a dict, got {model_overrides!r}",
    )
    return models_lib.get_model(
        model, dataset.num_classes, dataset.image_shape, **(model_overrides or {})
    )


def _check_int(field: str, value: Any, minimum: int) -> None:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= minimum
    check(ok, f"{field}={value!r} must be an integer >= {minimum}")


def _new_meta(dataset: Dataset, net, settings: dict) -> dict:
    """``experts.json`` for a new run (before any expert is complete)."""
    labels_hash = hashlib.sha256(np.ascontiguousarray(dataset.y_train).tobytes()).hexdigest()
    num_params = models_lib.count_params(models_lib.variable_shapes(net, dataset.image_shape))
    return {
        "format": FORMAT,
        "dataset": dataset.name,
        "zca": dataset.zca is not None,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "image_shape": list(dataset.image_shape),
        "num_classes": dataset.num_classes,
        "num_train": len(dataset.y_train),
        "train_labels_sha256": labels_hash[:16],
        "model": settings["model"],
        "model_overrides": dict(settings["model_overrides"] or {}),
        "num_params": num_params,
        **{k: settings[k] for k in ("epochs", "lr", "momentum", "weight_decay", "batch_size")},
        **{k: settings[k] for k in ("augment", "seed", "num_experts")},
        "completed": [],
        "experts": {},
    }


def read_meta(out_dir: str | os.PathLike) -> dict:
    """``out_dir/experts.json`` as a dict, with ``'path'`` (the directory) added.

    Raises:
      DDJaxError: if the directory holds no (readable) ``experts.json``.
    """
    file = Path(out_dir) / META_FILE
    check(
        file.is_file(),
        f"{out_dir} has no {META_FILE}: not an experts directory (create one with ddjax experts)",
    )
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DDJaxError(f"{file} cannot be read: {e}") from None
    check(
        isinstance(meta, dict) and meta.get("format") == FORMAT,
        f"{file} is not an experts.json of format {FORMAT}",
    )
    return {**meta, "path": str(out_dir)}


def completed(out_dir: str | os.PathLike) -> list[int]:
    """Indices of the experts whose trajectories are complete, sorted."""
    meta = read_meta(out_dir)
    return sorted(i for i in meta["completed"] if checkpoint.exists(expert_dir(out_dir, i)))


def expert_dir(out_dir: str | os.PathLike, index: int) -> Path:
    """The checkpoint directory of expert ``index``."""
    return Path(out_dir) / f"expert_{index:04d}"


def _write_meta(out_dir: Path, meta: dict) -> None:
    write_json(out_dir / META_FILE, {k: v for k, v in meta.items() if k != "path"})


def _check_same_training(saved: dict, current: dict, out_dir: Path) -> None:
    for field in TRAINING_FIELDS:
        if saved.get(field) != current[field]:
            raise DDJaxError(
                f"{out_dir} holds experts trained with {field}={saved.get(field)!r}; this run "
                f"has {field}={current[field]!r} (use another out_dir or the same settings)"
            )


def check_compatible(
    meta: dict,
    *,
    dataset_name: str,
    zca: bool,
    model: str,
    model_overrides: dict | None,
    image_shape: Sequence[int],
    num_classes: int,
    min_epochs: int,
    min_epochs_reason: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> None:
    """Checks that experts (``read_meta(out_dir)``) can guide a distillation run.

    Args:
      meta: from :func:`read_meta`.
      dataset_name, zca, model, model_overrides, image_shape, num_classes: the run's.
      min_epochs: the epochs the run needs (MTT: ``max_start_epoch + expert_epochs``).
      min_epochs_reason: what needs them, for the message, e.g.
        ``'max_start_epoch + expert_epochs = 22'`` (default ``'this run'``).
      mean, std: the run's normalisation constants (``Dataset.mean``/``.std``); checked when
        given, since the same dataset name can be loaded with other constants (``folder:``
        data with ``normalisation='computed'`` or ``'tiny_imagenet'``).

    Raises:
      DDJaxError: one line naming the first mismatching field and both values, or saying that
        no expert is complete yet.
    """
    where = f"experts in {meta.get('path', 'the experts directory')}"
    mine = {
        "dataset": dataset_name,
        "model": model,
        "model_overrides": dict(model_overrides or {}),
        "image_shape": list(image_shape),
        "num_classes": num_classes,
    }
    check(
        meta["dataset"] == dataset_name,
        f"{where} were trained on dataset={meta['dataset']!r}, this run uses {dataset_name!r}",
    )
    if bool(meta["zca"]) != bool(zca):
        state = {True: "on", False: "off"}
        raise DDJaxError(
            f"{where} were trained with ZCA {state[bool(meta['zca'])]}, this run has ZCA "
            f"{state[bool(zca)]} (ZCA must match; set dataset.zca={bool(meta['zca'])})"
        )
    for field in ("model", "model_overrides", "image_shape", "num_classes"):
        check(
            meta[field] == mine[field],
            f"{where} were trained with {field}={meta[field]!r}, this run uses {mine[field]!r}",
        )
    for field, values in (("mean", mean), ("std", std)):
        if values is not None and not np.allclose(meta[field], values, rtol=1e-6, atol=1e-7):
            raise DDJaxError(
                f"{where} were trained on images normalised with {field}={meta[field]}, this "
                f"run uses {field}={[float(v) for v in values]} (dataset.normalisation must match)"
            )
    reason = min_epochs_reason or "this run"
    check(
        meta["epochs"] >= min_epochs,
        f"{reason} needs at least {min_epochs} epochs, {where} have {meta['epochs']}",
    )
    check(bool(meta["completed"]), f"{where}: none is complete yet (run ddjax experts first)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def trajectory_shapes(meta: dict) -> Params:
    """The ``params`` tree of one trajectory as ``jax.ShapeDtypeStruct`` (``[epochs+1, ...]``)."""
    net = models_lib.get_model(
        meta["model"], meta["num_classes"], tuple(meta["image_shape"]), **meta["model_overrides"]
    )
    shapes = models_lib.variable_shapes(net, tuple(meta["image_shape"]))["params"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((meta["epochs"] + 1, *s.shape), np.float32, sharding=device),
        shapes,
    )


def load_trajectory(out_dir: str | os.PathLike, index: int) -> Params:
    """Expert ``index``'s ``params`` with a leading epoch axis ``[epochs + 1, ...]`` (NumPy)."""
    return jax.tree.map(lambda x: x[0], load_trajectories(out_dir, [index]))


def load_trajectories(
    out_dir: str | os.PathLike, indices: Sequence[int], *, as_numpy: bool = True
) -> Params:
    """The ``params`` of several experts, stacked: leaves ``[len(indices), epochs + 1, ...]``.

    Experts are stacked in the order of ``indices`` (repeats allowed). Distillation loads a
    subset at a time to stay inside memory, as MTT loads one ``replay_buffer_*.pt`` at a time;
    only one expert more than the result is held while loading.

    Args:
      out_dir: an experts directory.
      indices: completed experts (see :func:`completed`).
      as_numpy: host NumPy arrays (default) or arrays on the default device.

    Returns:
      The ``params`` pytree (float32) of the model the experts were trained as.

    Raises:
      DDJaxError: an index that is not a completed expert (naming the completed ones).
    """
    meta = read_meta(out_dir)
    done = set(completed(out_dir))
    indices = [int(i) for i in indices]
    check(len(indices) >= 1, "load_trajectories: no expert indices given")
    for i in indices:
        check(
            i in done,
            f"expert {i} is not a completed expert in {out_dir} "
            f"(completed: {_ranges(sorted(done)) or 'none'})",
        )
    like = {"params": trajectory_shapes(meta)}
    stacked = jax.tree.map(lambda s: np.empty((len(indices), *s.shape), s.dtype), like["params"])
    for row, i in enumerate(indices):
        one = checkpoint.load_tree(expert_dir(out_dir, i), like)["params"]
        _put(stacked, row, one)
    return stacked if as_numpy else jax.device_put(stacked)


def forgetting_scores(out_dir: str | os.PathLike) -> np.ndarray:
    """Mean forgetting count over the completed experts, per train example (train order).

    Never-learned examples count ``epochs`` (see the module docstring); higher is harder.

    Returns:
      float32 ``(n_train,)``.
    """
    file = Path(out_dir) / FORGETTING_FILE
    check(file.is_file(), f"{out_dir} has no {FORGETTING_FILE} (no expert is complete yet)")
    with np.load(file) as saved:
        return saved["mean"].astype(np.float32)


def _put(out: Params, index, values: Params) -> None:
    """``out[index] = values`` leaf by leaf (NumPy buffers, in place)."""
    for buffer, value in zip(jax.tree.leaves(out), jax.tree.leaves(values), strict=True):
        buffer[index] = np.asarray(value)


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    parts, start = [], None
    for k, v in enumerate(values):
        if start is None:
            start = v
        if k + 1 == len(values) or values[k + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _init_group(net, tx, image_shape, init_keys: Sequence[jax.Array]) -> train.TrainState:
    """Fresh networks, one per key, each initialised on its own, stacked into a pool.

    One model at a time, so that the (slow to compile) initialisation program is the same
    whatever the group size, and expert ``i``'s initial weights cannot depend on it. The state
    is built as ``train.init_state`` builds it (same dtypes and weak types), so a ``train.fit``
    of the same model runs the same compiled step. With several devices the pool axis is
    sharded over them.
    """
    states = []
    for key in init_keys:
        variables = models_lib.init_variables(net, key, image_shape)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        states.append(train.TrainState(params, batch_stats, tx.init(params)))
    pool = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    if jax.device_count() == 1:
        return pool
    return sharding.shard_pool(pool, sharding.pool_mesh(len(states)))


def _params_to_host(state: train.TrainState) -> Params:
    """The pool's ``params``, as float32 NumPy arrays."""
    return jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(state.params))


def _empty_record(params_like: Params, num_models: int, epochs: int, n: int) -> dict:
    """Host buffers for a group: trajectories, forgetting state, per-epoch numbers."""
    nan = np.full((num_models, epochs), np.nan, np.float32)
    return {
        "trajectory": jax.tree.map(
            lambda x: np.zeros((num_models, epochs + 1, *x.shape[1:]), np.float32), params_like
        ),
        "forgetting": forgetting_init((num_models, n)),
        "train_loss": nan.copy(),
        "train_accuracy": nan.copy(),
        "test_accuracy": nan.copy(),
    }


def train_experts(
    dataset: Dataset,
    *,
    out_dir: str | os.PathLike,
    model: str = "ConvNet",
    model_overrides: dict | None = None,
    num_experts: int = 100,
    epochs: int = 50,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    augment: str = "dsa",
    seed: int = 0,
    pool_mode: str = "auto",
    experts_at_once: int = 10,
    test_every: int = 1,
    test_limit: int | None = None,
    checkpoint_every: int = 5,
    progress: bool = True,
    log: Log | None = None,
    _stop_after_epochs: int | None = None,
) -> dict:
    """Trains expert trajectories with MTT's recipe into ``out_dir`` (resuming what is there).

    Args:
      dataset: the real data (its train split is what the experts learn; ZCA or not).
      out_dir: the experts directory (created). See the module docstring for its files.
      model: a :func:`ddjax.models.get_model` name (MTT: ``ConvNet``; ``ConvNetD4`` at 64 px).
      model_overrides: model fields replacing the name's settings, e.g. ``{'width': 64}``.
      num_experts: experts ``0 .. num_experts - 1``; raise it later to add more.
      epochs: epochs per expert; ``epochs + 1`` snapshots are saved.
      lr, momentum, weight_decay: SGD (PyTorch semantics; MTT: 0.01, 0, 0), constant rate.
      batch_size: minibatch size (MTT: 256; the last, smaller batch is kept).
      augment: ``'dsa'`` (MTT), ``'crop_flip'`` or ``'none'``, on every batch.
      seed: expert ``i``'s keys depend on ``(seed, i)`` only (:func:`expert_keys`).
      pool_mode: ``'auto'``, ``'vmap'`` or ``'loop'`` (:func:`ddjax.train.resolve_pool_mode`).
      experts_at_once: experts trained side by side (does not change the results).
      test_every: test accuracy every this many epochs (and after the last).
      test_limit: test on the first this many test images (``None``: all).
      checkpoint_every: save the group's progress every this many epochs.
      progress: a progress bar (silent when stderr is not a terminal).
      log: called as ``log(event=..., **fields)`` after every epoch (``'expert_epoch'``:
        losses, train and test accuracies of the group) and every completed group
        (``'experts_done'``: final test accuracies, seconds), e.g. ``Workdir.log``.
      _stop_after_epochs: testing hook: return (as if killed) after this many epochs.

    Returns:
      The metadata (:func:`read_meta`).

    Raises:
      DDJaxError: bad settings, or ``out_dir`` holding experts trained with other settings.
    """
    settings = dict(
        model=model,
        model_overrides=model_overrides,
        num_experts=num_experts,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        augment=augment,
        seed=seed,
        pool_mode=pool_mode,
        experts_at_once=experts_at_once,
        test_every=test_every,
        test_limit=test_limit,
        checkpoint_every=checkpoint_every,
    )
    net = check_settings(dataset, **settings)
    out_dir = Path(out_dir)
    meta = json.loads(json.dumps(_new_meta(dataset, net, settings)))  # as stored (lists, ...)
    if (out_dir / META_FILE).exists():
        saved = read_meta(out_dir)
        _check_same_training(saved, meta, out_dir)
        meta = {**saved, "num_experts": num_experts}
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_meta(out_dir, meta)

    group = _pending_group(out_dir, meta, experts_at_once)
    if group is None:
        return read_meta(out_dir)
    tx = train.sgd(lr, momentum=momentum, weight_decay=weight_decay)
    step = train.make_train_step(net, tx, augment_lib.make_augment(augment), with_correct=True)
    run = _Run(
        net=net,
        tx=tx,
        step=step,
        source=train.ArraySource(dataset.x_train, dataset.y_train, batch_size),
        pool_mode=train.resolve_pool_mode(pool_mode),
        test_images=jnp.asarray(dataset.x_test[:test_limit]),
        test_labels=jnp.asarray(dataset.y_test[:test_limit]),
        num_classes=dataset.num_classes,
        image_shape=dataset.image_shape,
        settings=settings,
        progress=progress,
        log=log,
    )
    budget = [math.inf if _stop_after_epochs is None else _stop_after_epochs]
    while group is not None:
        start = time.time()
        record = _train_group(run, group, out_dir, budget)
        if record is None:  # stopped by _stop_after_epochs
            break
        meta = _finish_group(out_dir, meta, group, record, dataset.y_train, epochs)
        if log is not None:
            final = record["test_accuracy"][:, -1].tolist()
            seconds = round(time.time() - start, 1)
            log(event="experts_done", experts=group, final_test_accuracy=final, seconds=seconds)
        group = _pending_group(out_dir, meta, experts_at_once)
    return read_meta(out_dir)


def _pending_group(out_dir: Path, meta: dict, experts_at_once: int) -> list[int] | None:
    """The group to train next: an interrupted one in ``_partial/``, else the next unfinished."""
    done = set(meta["completed"])
    group_file = out_dir / PARTIAL_DIR / "group.json"
    if group_file.exists():
        group = json.loads(group_file.read_text())["experts"]
        if not set(group) <= done:
            return group
        shutil.rmtree(out_dir / PARTIAL_DIR)  # killed between finishing a group and cleaning up
    todo = [i for i in range(meta["num_experts"]) if i not in done]
    return todo[:experts_at_once] or None


class _Run(NamedTuple):
    """What every group of a run trains with (built once per run)."""

    net: nn.Module
    tx: Any
    step: Callable
    source: train.ArraySource
    pool_mode: str
    test_images: jax.Array
    test_labels: jax.Array
    num_classes: int
    image_shape: tuple
    settings: dict  # as checked by check_settings
    progress: bool
    log: Log | None


def _train_group(run: _Run, group: list[int], out_dir: Path, budget: list) -> dict | None:
    """Trains the experts ``group`` side by side; returns their record (``None`` if stopped)."""
    epochs, test_every, log = run.settings["epochs"], run.settings["test_every"], run.log
    partial_dir = out_dir / PARTIAL_DIR
    partial_dir.mkdir(exist_ok=True)
    group_file = partial_dir / "group.json"
    if not group_file.exists():
        write_json(group_file, {"experts": group})
    keys = [expert_keys(run.settings["seed"], i) for i in group]
    train_keys = jnp.stack([k[1] for k in keys])

    state = _init_group(run.net, run.tx, run.image_shape, [k[0] for k in keys])
    params = _params_to_host(state)
    record = _empty_record(params, len(group), epochs, len(run.source.labels))
    _put(record["trajectory"], (slice(None), 0), params)

    def on_epoch(epoch: int, state: train.TrainState, outputs: train.EpochOutputs) -> dict:
        losses, correct = outputs
        _put(record["trajectory"], (slice(None), epoch + 1), _params_to_host(state))
        record["forgetting"] = forgetting_update(record["forgetting"], correct)
        record["train_loss"][:, epoch] = losses
        record["train_accuracy"][:, epoch] = correct.mean(1)
        fields = {"train_loss": losses.tolist(), "train_accuracy": correct.mean(1).tolist()}
        postfix = {"loss": f"{losses.mean():.4f}"}
        if (epoch + 1) % test_every == 0 or epoch + 1 == epochs:
            accuracy, _ = train.pool_accuracy(
                run.net,
                state,
                run.test_images,
                run.test_labels,
                run.num_classes,
                pool_mode=run.pool_mode,
            )
            record["test_accuracy"][:, epoch] = accuracy
            fields["test_accuracy"] = accuracy.tolist()
            postfix["acc"] = f"{accuracy.mean():.4f}"
        if log is not None:
            log(event="expert_epoch", experts=group, epoch=epoch + 1, **fields)
        return postfix

    description = f"experts {_ranges(group)} of {run.settings['num_experts']}"
    with checkpoint.Checkpoints(partial_dir / "checkpoints", keep=1) as saves:
        start = saves.latest_step() or 0
        result = train.train_epochs(
            state,
            run.step,
            run.source,
            epochs=epochs,
            epoch_keys=lambda epoch: jax.vmap(epoch_key, in_axes=(0, None))(train_keys, epoch),
            pool_mode=run.pool_mode,
            on_epoch=on_epoch,
            record=record,
            checkpoints=saves,
            checkpoint_every=run.settings["checkpoint_every"],
            checkpoint_final=False,  # a finished group is written out at once
            progress=description if run.progress else None,
            stop_after_epochs=None if math.isinf(budget[0]) else budget[0],
        )
    if result is None:  # the testing hook: stopped as a kill would, saving nothing more
        return None
    budget[0] -= epochs - start
    return record


def _finish_group(
    out_dir: Path, meta: dict, group: list[int], record: dict, train_labels, epochs: int
) -> dict:
    """Writes a finished group: trajectories, then forgetting counts, then the metadata.

    The order makes a kill at any moment safe: an expert counts as complete only once
    ``experts.json`` lists it, and everything it lists was written before.
    """
    for row, index in enumerate(group):
        trajectory = jax.tree.map(lambda x, row=row: x[row], record["trajectory"])
        checkpoint.save_tree(expert_dir(out_dir, index), {"params": trajectory})
    _save_forgetting(out_dir, group, record["forgetting"], train_labels, epochs)
    for row, index in enumerate(group):
        tested = np.flatnonzero(~np.isnan(record["test_accuracy"][row]))
        meta["experts"][str(index)] = {
            "test_accuracy": {str(e + 1): float(record["test_accuracy"][row, e]) for e in tested},
            "final_test_accuracy": float(record["test_accuracy"][row, -1]),
            "train_loss": [round(float(x), 6) for x in record["train_loss"][row]],
            "train_accuracy": [round(float(x), 6) for x in record["train_accuracy"][row]],
        }
    meta["completed"] = sorted(set(meta["completed"]) | set(group))
    _write_meta(out_dir, meta)
    shutil.rmtree(out_dir / PARTIAL_DIR)
    return meta


def _save_forgetting(
    out_dir: Path, group: list[int], state: ForgettingState, train_labels, epochs: int
) -> None:
    """Merges the group's forgetting statistics into ``forgetting.npz`` (atomically)."""
    file = out_dir / FORGETTING_FILE
    rows: dict[int, tuple] = {}
    if file.exists():
        with np.load(file) as saved:
            for k, i in enumerate(saved["experts"]):
                rows[int(i)] = (saved["events"][k], saved["learned"][k])
    for k, i in enumerate(group):
        rows[i] = (state.events[k], state.learned[k])
    experts = np.asarray(sorted(rows), np.int32)
    events = np.stack([rows[i][0] for i in experts]).astype(np.int32)
    learned = np.stack([rows[i][1] for i in experts]).astype(bool)
    counts = forgetting_counts(ForgettingState(None, learned, events), epochs)
    tmp = out_dir / (FORGETTING_FILE + ".tmp.npz")
    np.savez(
        tmp,
        experts=experts,
        counts=counts,
        events=events,
        learned=learned,
        sum=counts.sum(0).astype(np.int64),
        mean=counts.mean(0).astype(np.float32),
        labels=np.asarray(train_labels, np.int32),
        epochs=np.int32(epochs),
    )
    os.replace(tmp, file)


def summary(meta: dict) -> dict:
    """Completed experts and their final test accuracy (mean, std over experts)."""
    finals = [meta["experts"][str(i)]["final_test_accuracy"] for i in meta["completed"]]
    return {
        "num_experts": meta["num_experts"],
        "completed": len(meta["completed"]),
        "epochs": meta["epochs"],
        "final_test_accuracy_mean": float(np.mean(finals)) if finals else None,
        "final_test_accuracy_std": float(np.std(finals)) if finals else None,
    }
