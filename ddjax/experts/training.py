"""Training expert trajectories with MTT's recipe, a group of experts side by side.

One group of ``experts_at_once`` experts is trained through :func:`ddjax.train.train_epochs`;
its ``on_epoch`` keeps the trajectory snapshots, the forgetting state and the test accuracy,
all checkpointed with the state so a killed group resumes bit-identically
(:mod:`ddjax.experts` describes the keys and files).
"""

from __future__ import annotations

import dataclasses
import functools
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
from ddjax import checkpoint, distributed, guard, loop, sharding, train
from ddjax import data as data_lib
from ddjax import evaluate as evaluate_lib
from ddjax import models as models_lib
from ddjax.data import Dataset, StreamingDataset
from ddjax.errors import check
from ddjax.experts.forgetting import (
    ForgettingState,
    forgetting_counts,
    forgetting_init,
    forgetting_update,
)
from ddjax.experts.store import (
    FORGETTING_FILE,
    META_FILE,
    PARTIAL_DIR,
    _check_same_training,
    _new_meta,
    _put,
    _ranges,
    _write_meta,
    check_settings,
    expert_dir,
    read_meta,
)
from ddjax.workdir import write_json

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
    return jax.tree.map(lambda x: np.asarray(x, np.float32), distributed.to_host(state.params))


def _empty_record(params_like: Params, num_models: int, epochs: int, n: int) -> dict:
    """Host buffers for a group: trajectories, forgetting state, per-epoch numbers."""
    nan = np.full((num_models, epochs), np.nan, np.float32)
    record = {
        "trajectory": jax.tree.map(
            lambda x: np.zeros((num_models, epochs + 1, *x.shape[1:]), np.float32), params_like
        ),
        "train_loss": nan.copy(),
        "train_accuracy": nan.copy(),
        "test_accuracy": nan.copy(),
    }
    if n:  # a stream (n = 0) has no per-example record to count forgetting events in
        record["forgetting"] = forgetting_init((num_models, n))
    return record


def train_experts(
    dataset: Dataset | StreamingDataset,
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
    rewind: Callable[..., Any] | None = None,
    epoch_subset: Callable[[int], np.ndarray] | None = None,
    example_schedule: dict | None = None,
    workers: int = 0,
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
      rewind: called as ``rewind(epochs_done, key='epoch', where={'event': 'expert_epoch',
        'experts': group})`` when a group starts or resumes, e.g. ``Workdir.rewind``: drops
        the epochs logged after the group's checkpoint, which are trained and logged again.
      epoch_subset: ``epoch -> train indices`` the experts train on in that epoch (e.g. PAD's
        easy-to-hard schedule, :func:`ddjax.distill.pad.epoch_indices`); ``None``: all of
        them every epoch (MTT). Forgetting events count only presented examples.
      example_schedule: what ``epoch_subset`` is, recorded in ``experts.json`` and checked on
        resume like the other training settings (required with ``epoch_subset``).
      workers: a stream's grain worker processes.
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
    streamed = isinstance(dataset, StreamingDataset)
    if streamed:
        check(
            epoch_subset is None,
            "an example schedule (PAD) picks examples of an in-memory train set; a stream "
            "cannot follow one: unset config.example_schedule.name",
        )
        check(
            test_limit is None,
            "test_limit: a stream's test split is read whole; unset config.test_limit",
        )
    check(
        (epoch_subset is None) == (example_schedule is None),
        "train_experts: epoch_subset and example_schedule (its description) go together",
    )
    meta = _new_meta(dataset, net, settings)
    meta["example_schedule"] = example_schedule
    meta = json.loads(json.dumps(meta))  # as stored (lists, ...)
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
    if streamed:
        # Every expert trains on every batch (the pool shares them): each process reads whole
        # batches, placed beside the pool by the driver.
        source = data_lib.StreamSource(
            dataset, batch_size, seed=seed, worker_count=workers, process_index=0, process_count=1
        )
        test_set = dataset
    else:
        source = train.ArraySource(dataset.x_train, dataset.y_train, batch_size, epoch_subset)
        test_set = dataclasses.replace(
            dataset, x_test=dataset.x_test[:test_limit], y_test=dataset.y_test[:test_limit]
        )
    run = _Run(
        net=net,
        tx=tx,
        step=step,
        source=source,
        pool_mode=train.resolve_pool_mode(pool_mode),
        test_set=test_set,
        num_examples=0 if streamed else len(dataset.y_train),  # forgetting counts
        num_classes=dataset.num_classes,
        image_shape=dataset.image_shape,
        settings=settings,
        progress=progress,
        log=log,
        rewind=rewind,
    )
    budget = [math.inf if _stop_after_epochs is None else _stop_after_epochs]
    while group is not None:
        start = time.time()
        record = _train_group(run, group, out_dir, budget)
        if record is None:  # stopped by _stop_after_epochs
            break
        train_labels = None if streamed else dataset.y_train
        meta = _finish_group(out_dir, meta, group, record, train_labels, epochs)
        if log is not None:
            final = record["test_accuracy"][:, -1].tolist()
            seconds = round(time.time() - start, 1)
            log(event="experts_done", experts=group, final_test_accuracy=final, seconds=seconds)
        group = _pending_group(out_dir, meta, experts_at_once)
    return read_meta(out_dir)


def _pending_group(out_dir: Path, meta: dict, experts_at_once: int) -> list[int] | None:
    """The group to train next: an interrupted one in ``_partial/``, else the next unfinished."""
    # An expert whose trajectory was removed (damaged: see store.damage_remedy) trains again.
    done = {i for i in meta["completed"] if checkpoint.exists(expert_dir(out_dir, i))}
    group_file = out_dir / PARTIAL_DIR / "group.json"
    if group_file.exists():
        group = json.loads(group_file.read_text())["experts"]
        if not set(group) <= done:
            return group
        # Killed between finishing a group and cleaning up.
        distributed.on_primary("remove partial", lambda: shutil.rmtree(out_dir / PARTIAL_DIR))
    todo = [i for i in range(meta["num_experts"]) if i not in done]
    return todo[:experts_at_once] or None


class _Run(NamedTuple):
    """What every group of a run trains with (built once per run)."""

    net: nn.Module
    tx: Any
    step: Callable
    source: train.BatchSource
    pool_mode: str
    test_set: Dataset | StreamingDataset
    num_examples: int
    num_classes: int
    image_shape: tuple
    settings: dict  # as checked by check_settings
    progress: bool
    log: Log | None
    rewind: Callable[..., Any] | None


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
    record = _empty_record(params, len(group), epochs, run.num_examples)
    _put(record["trajectory"], (slice(None), 0), params)

    def on_epoch(epoch: int, state: train.TrainState, outputs: train.EpochOutputs) -> dict:
        losses, correct = outputs
        _put(record["trajectory"], (slice(None), epoch + 1), _params_to_host(state))
        record["train_loss"][:, epoch] = losses
        # null: an epoch with a skipped update (ddjax.guard) has no finite mean loss.
        fields = {"train_loss": guard.finite_or_none(losses)}
        if correct is not None:  # a stream has no per-example record: no forgetting counts
            subset = getattr(run.source, "epoch_subset", None)
            presented = None if subset is None else subset(epoch)
            record["forgetting"] = forgetting_update(record["forgetting"], correct, presented)
            record["train_accuracy"][:, epoch] = correct.mean(1)
            fields["train_accuracy"] = correct.mean(1).tolist()
        postfix = {"loss": f"{losses.mean():.4f}"}
        if (epoch + 1) % test_every == 0 or epoch + 1 == epochs:
            accuracy, _ = evaluate_lib.pool_test_accuracy(
                run.net, state, run.test_set, pool_mode=run.pool_mode
            )
            record["test_accuracy"][:, epoch] = accuracy
            fields["test_accuracy"] = accuracy.tolist()
            postfix["acc"] = f"{accuracy.mean():.4f}"
        if log is not None:
            log(event="expert_epoch", experts=group, epoch=epoch + 1, **fields)
        return postfix

    def resumed(epochs_done: int) -> None:
        where = {"event": "expert_epoch", "experts": group}
        run.rewind(epochs_done, key="epoch", where=where)

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
            on_resume=None if run.rewind is None else resumed,
            log=None if log is None else functools.partial(log, experts=group),
            stage=f"experts {_ranges(group)}",
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
    if train_labels is not None:  # a stream records no per-example correctness
        _save_forgetting(out_dir, group, record["forgetting"], train_labels, epochs)
    for row, index in enumerate(group):
        tested = np.flatnonzero(~np.isnan(record["test_accuracy"][row]))
        meta["experts"][str(index)] = {
            "test_accuracy": {str(e + 1): float(record["test_accuracy"][row, e]) for e in tested},
            "final_test_accuracy": guard.finite_or_none(record["test_accuracy"][row, -1]),
            "train_loss": [
                None if not np.isfinite(x) else round(float(x), 6)
                for x in record["train_loss"][row]
            ],
            "train_accuracy": [
                None if np.isnan(x) else round(float(x), 6) for x in record["train_accuracy"][row]
            ],
        }
    meta["completed"] = sorted(set(meta["completed"]) | set(group))
    _write_meta(out_dir, meta)
    distributed.on_primary("remove partial", lambda: shutil.rmtree(out_dir / PARTIAL_DIR))
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
    loop.atomic_savez(
        out_dir / FORGETTING_FILE,
        experts=experts,
        counts=counts,
        events=events,
        learned=learned,
        sum=counts.sum(0).astype(np.int64),
        mean=counts.mean(0).astype(np.float32),
        labels=np.asarray(train_labels, np.int32),
        epochs=np.int32(epochs),
    )
