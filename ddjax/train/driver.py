"""The one epoch loop of ddjax: :func:`train_epochs` over a :class:`BatchSource`.

Experts, the SRe2L teacher (squeeze), KD students and the evaluation of synthetic sets all
train through :func:`train_epochs`: one model or a pool of K models, an optimiser with its
per-epoch learning rate and resets, an ``on_epoch`` callback, the pool's placement decided
once (:func:`ddjax.train.resolve_pool_mode`) and resume from :class:`ddjax.checkpoint.Checkpoints`.
The batches come from a source: in-memory arrays reshuffled every epoch (:class:`ArraySource`),
KD's replayed views (:class:`ddjax.sre2l.kd.ViewSource`), or any iterator that keeps the
:class:`BatchSource` promises. :func:`fit_pool` and :func:`fit` are the in-memory shortcuts.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ddjax import checkpoint, distributed, guard, sharding, xla
from ddjax.errors import DDJaxError, check
from ddjax.train.step import (
    TrainState,
    _like,
    _num_models,
    _sharding_of,
    _shuffle,
    _split_output,
    _stack,
    _take,
    make_epoch,
    make_loop_epoch,
    make_pool_epoch,
    resolve_pool_mode,
    set_learning_rate,
)

Array = jax.Array

# --------------------------------------------------------------------------------------------
# Batch sources
# --------------------------------------------------------------------------------------------

Batch = tuple[Array, Array, Array]


@runtime_checkable
class BatchSource(Protocol):
    """Where :func:`train_epochs` takes its minibatches from, one epoch at a time.

    What a source promises:

    * ``epoch_batches(epoch, key)`` yields the batches of 0-based ``epoch`` as
      ``(images, labels, key)``: ``images`` ``(B, H, W, C)``, ``labels`` whatever the step's
      loss takes (``(B,)`` classes, ``(B, C)`` targets or teacher logits), and the PRNG key
      the train step uses for that batch (its augmentation). ``B`` may change from batch to
      batch (a smaller last batch); each new ``B`` compiles the step once.
    * **Determinism**: the same ``(epoch, key)`` gives the same batches in any process,
      whatever was drawn before -- so a run resumed at epoch ``e`` trains on exactly the
      batches an uninterrupted run would have.
    * ``per_model``: ``True`` if the batches depend on ``key`` -- each model of a pool draws
      its own epoch with its own key (the in-memory shuffle); ``False`` if they do not
      (``key`` is ignored, may be ``None``): the batches are drawn once per epoch and every
      model of a pool trains on them (KD's replayed views: one teacher forward for K students).

    Nothing else is assumed: no length, no random access; a stream fits.
    """

    per_model: bool

    def epoch_batches(self, epoch: int, key: Array | None) -> Iterator[Batch]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
    """In-memory arrays, reshuffled every epoch: PyTorch's ``DataLoader(shuffle=True)``.

    The epoch of key ``k`` is the permutation and the per-batch keys :func:`make_epoch` draws
    from ``k``: full batches of ``batch_size`` and a smaller last one (``drop_last=False``).
    The epoch number does not enter; :func:`train_epochs` gives every model its own key per
    epoch. :func:`train_epochs` runs an epoch of this source as one compiled program
    (:func:`make_epoch` / :func:`make_loop_epoch`: the gather inside the step, per-example
    outputs in data order); :meth:`epoch_batches` yields exactly the batches those programs
    train on.

    With ``epoch_subset``, epoch ``e`` trains on the examples ``epoch_subset(e)`` only (e.g.
    PAD's easy-to-hard schedule, :mod:`ddjax.distill.pad`), shuffled the same way; its
    per-example outputs are in the order of those indices. Each new subset size compiles the
    epoch program once.
    """

    images: Any
    labels: Any
    batch_size: int
    epoch_subset: Callable[[int], np.ndarray] | None = None
    per_model: bool = dataclasses.field(default=True, init=False)

    def arrays(self, epoch: int) -> tuple[Any, Any]:
        """The images and labels epoch ``epoch`` trains on."""
        if self.epoch_subset is None:
            return self.images, self.labels
        index = np.asarray(self.epoch_subset(epoch))
        return self.images[index], self.labels[index]

    def epoch_batches(self, epoch: int, key: Array | None) -> Iterator[Batch]:
        images, labels = self.arrays(epoch)
        num_full, tail = divmod(images.shape[0], self.batch_size)
        perm, step_key = _shuffle(key, labels)
        keys = jax.random.split(step_key, num_full + (tail > 0))
        for b in range(num_full + (tail > 0)):
            index = perm[b * self.batch_size : (b + 1) * self.batch_size]
            yield images[index], labels[index], keys[b]


def pool_epoch_keys(key: Array, num_models: int) -> Callable[[int], Array]:
    """``epoch -> split(fold_in(key, epoch), num_models)``: the keys :func:`fit_pool` gives."""
    return lambda epoch: jax.random.split(jax.random.fold_in(key, epoch), num_models)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class EpochOutputs(NamedTuple):
    """What one epoch reports to ``on_epoch`` (host NumPy; a pool has a leading ``K`` axis).

    Attributes:
      loss: the mean training loss of the epoch, ``(K,)`` (``()`` for one model).
      per_example: a ``with_correct`` step's per-example outputs, ``(K, n)`` (``(n,)``), in
        the data's order -- only for an :class:`ArraySource`; ``None`` otherwise.
    """

    loss: np.ndarray
    per_example: np.ndarray | None


OnEpoch = Callable[[int, TrainState, EpochOutputs], dict | None]


def train_epochs(
    state: TrainState,
    step,
    source: BatchSource,
    *,
    epochs: int,
    epoch_keys: Callable[[int], Array] | None = None,
    pool: bool = True,
    pool_mode: str = "auto",
    lr_schedule: Callable[[int], float] | None = None,
    reset_optimizer_at: Sequence[int] = (),
    tx: optax.GradientTransformation | None = None,
    on_epoch: OnEpoch | None = None,
    record: dict | None = None,
    checkpoints: checkpoint.Checkpoints | None = None,
    checkpoint_every: int = 1,
    checkpoint_final: bool = True,
    checkpoint_every_batches: int | None = None,
    progress: str | None = None,
    stop_after_epochs: int | None = None,
    on_resume: Callable[[int], None] | None = None,
    log: Callable[..., None] | None = None,
    stage: str | None = None,
) -> tuple[TrainState, np.ndarray] | None:
    """Trains one model or a pool of K models for ``epochs`` epochs on ``source``'s batches.

    The one epoch loop of ddjax (experts, the squeeze teacher, KD students, evaluation). Per
    epoch ``e``, in this order: the optimiser reset (``e in reset_optimizer_at``) and the
    learning rate ``lr_schedule(e)``; one :func:`make_train_step` step per batch of the
    epoch; ``on_epoch(e, state, outputs)``; a checkpoint. Where the pool runs is decided
    here, once, by :func:`resolve_pool_mode`: ``'vmap'`` trains the pool as one vmapped
    program (its model axis may be sharded over a mesh; the data is replicated beside it),
    ``'loop'`` one model after another, each on the device that holds its slice. Both give
    the same numbers.

    **Resume.** With ``checkpoints``, the state and ``record`` are saved as step ``e + 1``
    after every ``checkpoint_every``-th epoch (and after the last with ``checkpoint_final``),
    and a call that finds a checkpoint continues after it: the restored state, ``record``
    restored in place, then epoch ``e + 1`` with the keys and learning rate that epoch
    always gets -- so a killed run ends bit-identical to an uninterrupted one.

    **Resume inside an epoch.** An ImageNet epoch is hours long. With
    ``checkpoint_every_batches=K`` (a source whose ``epoch_batches`` takes ``start_batch``, such
    as :class:`ddjax.data.StreamSource`), a checkpoint is also saved before every ``K``-th batch
    of an epoch: the state, ``record``, the epoch's running loss sum and example count, and the
    position (epoch, next batch). A resumed call continues at that batch -- without the epoch's
    optimiser reset, which already happened -- and the epoch's mean loss and the final state
    equal an uninterrupted run's bit for bit. Checkpoint steps then count the batches trained so
    far (the position is stored inside), so a directory is written either with or without
    ``checkpoint_every_batches``, not both.

    **Skipped updates** (:mod:`ddjax.guard`). The step keeps the old state where an update
    is not finite and counts it in ``state.skips``; after every epoch the driver reads the
    counters (one small sync per epoch), reports the epoch's skips through ``log`` as
    ``log(event='skipped', epoch=e + 1, count=..., reason=...)`` (``count``: one number per
    model for a pool) and stops with a one-line ``DDJaxError`` -- before that epoch's
    ``on_epoch`` and checkpoint, so the last checkpoint is the last good state -- when a
    model skipped every update of the epoch or :data:`ddjax.guard.MAX_CONSECUTIVE_SKIPS` in
    a row.

    Args:
      state: a pool-stacked :class:`TrainState` (``pool=True``; from :func:`init_pool`) or one
        model's (``pool=False``). Donated: do not reuse it.
      step: from :func:`make_train_step`.
      source: a :class:`BatchSource`.
      epochs: the total number of epochs (a resumed run trains the remaining ones).
      epoch_keys: ``epoch -> keys (K, ...)``, model ``i``'s key for the epoch (``K = 1`` for
        one model); only for ``source.per_model`` sources.
      pool: whether ``state`` has a leading model axis.
      pool_mode: ``'vmap'``, ``'loop'`` or ``'auto'`` (:func:`resolve_pool_mode`). For one
        model ``'vmap'`` is the epoch as one compiled program without a model axis.
      lr_schedule: ``epoch -> learning rate`` (an optimiser with an injected learning rate,
        e.g. :func:`sgd`); ``None`` keeps the optimiser's.
      reset_optimizer_at: epochs at whose start the optimiser state is re-initialised (PyTorch
        code that re-creates its optimiser when it decays the rate resets momentum).
      tx: the optimiser, needed for ``reset_optimizer_at``.
      on_epoch: ``on_epoch(epoch, state, outputs)`` after every epoch, with the state as
        ``state`` was given (pool-stacked or one model) and :class:`EpochOutputs`; it may
        update ``record`` and return a dict for the progress bar (``None``: the loss).
      record: host arrays (a dict of pytrees) that ``on_epoch`` keeps -- histories,
        trajectories -- saved with the state and restored in place on resume.
      checkpoints: where resume points go (``None``: none).
      checkpoint_every: save every this many epochs.
      checkpoint_final: also save after the last epoch.
      checkpoint_every_batches: also save before every this many batches inside an epoch
        (``None``: only at epoch ends); needs ``checkpoints`` and a source whose
        ``epoch_batches`` takes ``start_batch``.
      progress: description of a progress bar over epochs (``None``: none; silent when
        stderr is not a terminal).
      stop_after_epochs: testing hook, the kill of a test: return ``None`` after this many
        epochs of this call, after their ``on_epoch`` and checkpoint.
      on_resume: ``on_resume(epochs_done)`` once, before the first epoch of this call, with
        the epochs the restored checkpoint had finished (0 when none was restored): where a
        stage drops the events it logged after that checkpoint (``Workdir.rewind``).
      log: ``log(**record)`` receives the ``skipped`` records (e.g. ``Workdir.log``); they
        are also printed. ``None``: printed only.
      stage: the stage's name in those messages (``None``: ``progress`` or ``'training'``).

    Returns:
      ``(state, losses)``: the trained state (as given, pool-stacked or not) and the mean
      training loss of every epoch this call ran, ``(epochs_run, K)`` (``(epochs_run,)``
      for one model); ``None`` when stopped by ``stop_after_epochs``.
    """
    check(not reset_optimizer_at or tx is not None, "train_epochs: reset_optimizer_at needs `tx`")
    check(
        epoch_keys is not None or not source.per_model,
        "train_epochs: a per-model source needs epoch_keys",
    )
    mode = resolve_pool_mode(pool_mode, pool)
    if checkpoint_every_batches is not None:
        check(
            checkpoints is not None
            and isinstance(checkpoint_every_batches, int)
            and checkpoint_every_batches >= 1,
            "train_epochs: checkpoint_every_batches must be a positive integer and needs "
            f"`checkpoints`, got {checkpoint_every_batches!r}",
        )
        check(
            not isinstance(source, ArraySource)
            and "start_batch" in inspect.signature(source.epoch_batches).parameters,
            f"train_epochs: checkpoint_every_batches needs a source that can start an epoch at "
            f"a batch (epoch_batches(epoch, key, start_batch)); {type(source).__name__} cannot",
        )
    # Skip counters made by default (NumPy zeros, TrainState(params, stats, opt)) as arrays.
    state = state._replace(skips=jax.tree.map(jnp.asarray, state.skips))
    within = None
    if checkpoint_every_batches is not None:
        within = _Within(checkpoint_every_batches, checkpoints, state, pool, record)
    start = 0
    if checkpoints is not None and checkpoints.latest_step() is not None:
        latest = checkpoints.latest_step()
        like = {"state": state, "record": record}
        # Restored where the given state lives (one device, or sharded over a pool's mesh).
        restored = checkpoints.restore(latest, like if within is None else within.like(like))
        start = latest if within is None else within.restore(restored["position"])
        check(start <= epochs, f"checkpoint {checkpoints.directory} is at epoch {start} > {epochs}")
        state = TrainState(*restored["state"])
        if record is not None:
            record.update(jax.tree.map(np.array, restored["record"]))  # writable host copies
    if on_resume is not None:
        on_resume(start)
    placed = _Placed(state, pool, mode)
    if within is not None:
        within.placed = placed
    run_epoch = _epoch_runner(step, source, placed, within)
    history = []
    bar = tqdm(
        range(start, epochs),
        desc=progress,
        initial=start,
        total=epochs,
        unit="epoch",
        disable=True if progress is None else None,
        leave=False,
    )
    skips = _SkipWatch(placed, stage or progress, checkpoints, log)
    for count, epoch in enumerate(bar, start=1):
        keys = epoch_keys(epoch) if epoch_keys is not None else None
        resumed_inside = within is not None and within.start_batch > 0
        # A resumed partial epoch had its optimiser reset before the checkpoint was taken.
        resets = () if resumed_inside else reset_optimizer_at
        placed.prepare(epoch, lr_schedule, resets, tx)
        loss, per_example, num_steps = run_epoch(epoch, keys)
        skips.after_epoch(epoch, num_steps)
        history.append(loss)
        postfix = None
        if on_epoch is not None:
            loss_host, per_example = distributed.to_host((loss, per_example))  # one sync for all
            if isinstance(per_example, tuple | list):  # a looped pool: one array per model
                per_example = np.stack(per_example)
            outputs = EpochOutputs(np.asarray(loss_host), per_example)
            postfix = on_epoch(epoch, placed.gathered(), outputs)
        if postfix is None and (epoch % 10 == 0 or epoch + 1 == epochs):
            postfix = {"loss": f"{float(np.mean(distributed.to_host(loss))):.4f}"}
        if postfix is not None:
            bar.set_postfix(**postfix)
        last = epoch + 1 == epochs
        if checkpoints is not None and (
            ((epoch + 1) % checkpoint_every == 0 and not last) or (last and checkpoint_final)
        ):
            if within is None:
                state_host = jax.tree.map(np.asarray, distributed.to_host(placed.gathered()))
                checkpoints.save(epoch + 1, {"state": state_host, "record": record})
            else:
                within.save(epoch + 1)
        if stop_after_epochs is not None and count >= stop_after_epochs:
            bar.close()
            return None
    bar.close()
    losses = np.asarray(distributed.to_host(history), np.float32)
    shape = (len(history), placed.num_models) if pool else (len(history),)
    return placed.gathered(), losses.reshape(shape)


class _Placed:
    """The state where the pool mode puts it: one (stacked) state, or one state per model."""

    def __init__(self, state: TrainState, pool: bool, mode: str):
        self.pool, self.mode, self.like = pool, mode, state
        self.num_models = _num_models(state) if pool else 1
        if not pool:
            self.states = [state]
        elif mode == "loop":
            check(
                all(x.is_fully_addressable for x in jax.tree.leaves(state)),
                "pool_mode='loop' trains each model on this process's device that holds it; "
                "a pool spread over several processes needs pool_mode='vmap' or 'auto'",
            )
            # One state per model, each on the device that holds its slice of the pool.
            self.states = [_take(state, i) for i in range(self.num_models)]
        else:
            self.states = [state]
        self.vmapped = pool and mode == "vmap"

    def prepare(self, epoch, lr_schedule, reset_optimizer_at, tx) -> None:
        """Applies the optimiser reset and the learning rate for ``epoch``."""
        for i, state in enumerate(self.states):
            if epoch in reset_optimizer_at:
                init = jax.vmap(tx.init) if self.vmapped else tx.init
                state = state._replace(opt_state=_like(init(state.params), state.opt_state))
            if lr_schedule is not None:
                opt_state = set_learning_rate(state.opt_state, lr_schedule(epoch))
                state = state._replace(opt_state=opt_state)
            self.states[i] = state

    def skips(self) -> guard.Skips:
        """The models' skip counters on the host, ``(K,)`` int arrays (``(1,)``: one model)."""
        counters = distributed.to_host([state.skips for state in self.states])
        total = np.concatenate([np.atleast_1d(c.total) for c in counters])
        streak = np.concatenate([np.atleast_1d(c.streak) for c in counters])
        return guard.Skips(total, streak)

    def gathered(self) -> TrainState:
        """The state in the form it was given (a looped pool stacked again)."""
        if self.pool and self.mode == "loop":
            return _stack(self.states, self.like)
        return self.states[0]


class _SkipWatch:
    """The epoch driver's side of the guard: reports each epoch's skips, stops without progress."""

    def __init__(self, placed: _Placed, stage: str | None, checkpoints, log):
        self.placed, self.log = placed, log
        self.stage = stage or "training"
        self.kept = (
            "the last good state is the last checkpoint"
            if checkpoints is None
            else f"the last good state is the last checkpoint in {checkpoints.directory}"
        )
        self.reported = placed.skips().total

    def after_epoch(self, epoch: int, num_steps: int) -> None:
        skips = self.placed.skips()
        skipped = skips.total - self.reported
        self.reported = skips.total
        if not skipped.any():
            return
        count = skipped.tolist() if self.placed.pool else int(skipped[0])
        if self.log is not None:
            self.log(event="skipped", epoch=epoch + 1, count=count, reason=guard.REASON)
        tqdm.write(
            f"{self.stage}: epoch {epoch + 1}: {count} of {num_steps} updates skipped "
            f"({guard.REASON})"
        )
        where = f"epoch {epoch + 1}"
        if num_steps and (skipped >= num_steps).any():
            raise DDJaxError(
                guard.no_progress(
                    self.stage, f"all {num_steps} updates of {where} were skipped", self.kept
                )
            )
        guard.check_progress(skips.streak, stage=self.stage, where=where, kept=self.kept)


class _Within:
    """Checkpoints inside an epoch: the position and the partial epoch's running loss.

    Saved beside the state and ``record`` as ``position``: the epoch and the next batch, the
    number of batches trained so far in the run (the checkpoint's step), and the epoch's
    running loss sum (``()`` or ``(K,)`` float32, exactly the driver's accumulator) and
    example count.
    """

    def __init__(self, every: int, checkpoints, state: TrainState, pool: bool, record):
        self.every, self.checkpoints, self.record = every, checkpoints, record
        self.loss_shape = (_num_models(state),) if pool else ()
        self.start_batch, self.loss_sum, self.count = 0, 0.0, 0
        self.done = 0  # batches trained in the whole run, resumed runs included
        self.placed: _Placed | None = None

    def like(self, tree: dict) -> dict:
        """The restore template: ``tree`` plus the position."""
        scalar = np.zeros((), np.int32)
        loss_sum = np.zeros(self.loss_shape, np.float32)
        position = {"epoch": scalar, "batch": scalar, "done": scalar, "loss_sum": loss_sum}
        return {**tree, "position": {**position, "count": scalar}}

    def restore(self, position: dict) -> int:
        """Takes a restored position; returns the epoch to continue."""
        position = distributed.to_host(position)
        self.start_batch, self.done = int(position["batch"]), int(position["done"])
        self.loss_sum, self.count = jnp.asarray(position["loss_sum"]), int(position["count"])
        return int(position["epoch"])

    def resume_point(self) -> tuple[int, Any, int]:
        """``(start_batch, loss_sum, count)`` for the epoch about to run; later ones start at 0."""
        point = (self.start_batch, self.loss_sum, self.count)
        self.start_batch, self.loss_sum, self.count = 0, 0.0, 0
        return point

    def save(self, epoch: int, batch: int = 0, loss_sum: Any = 0.0, count: int = 0) -> None:
        """Saves the state and ``record`` as step ``done``, to continue at ``(epoch, batch)``."""
        state_host = jax.tree.map(np.asarray, distributed.to_host(self.placed.gathered()))
        loss_sum = np.broadcast_to(
            np.asarray(distributed.to_host(loss_sum), np.float32), self.loss_shape
        )
        position = {
            "epoch": np.int32(epoch),
            "batch": np.int32(batch),
            "done": np.int32(self.done),
            "loss_sum": np.array(loss_sum),
            "count": np.int32(count),
        }
        saved = {"state": state_host, "record": self.record, "position": position}
        self.checkpoints.save(self.done, saved)


def _epoch_runner(step, source: BatchSource, placed: _Placed, within: _Within | None = None):
    """``run(epoch, keys) -> (loss, per_example, num_steps)``: one epoch of ``placed``'s models.

    An :class:`ArraySource` runs as compiled whole-epoch programs; other sources feed their
    batches to the jitted step (vmapped over the pool with shared or per-model batches).
    Outputs stay on the devices (no sync), so looped devices run side by side. With
    ``within``, an epoch may start at a batch (with the restored running loss), and a
    checkpoint is saved before every ``within.every``-th batch (never before the batch it
    started at, nor after the last: the epoch end saves that).
    """
    states = placed.states
    if isinstance(source, ArraySource):
        form = "pool" if placed.vmapped else ("one" if placed.mode == "vmap" else "loop")
        program = _epoch_program(step, source.batch_size, form)
        data = _DataBeside((source.images, source.labels))

        def beside(epoch, state):
            if source.epoch_subset is None:
                return data.beside(state)
            return _DataBeside.put(source.arrays(epoch), state)

        def run_arrays(epoch, keys):
            if form != "loop":
                images, labels = beside(epoch, states[0])
                num_steps = -(-images.shape[0] // source.batch_size)
                one_key = keys if placed.vmapped else keys[0]
                states[0], out = program(states[0], images, labels, one_key)
                return (*_split_output(out), num_steps)
            outputs = []
            for i, one in enumerate(states):
                images, labels = beside(epoch, one)
                num_steps = -(-images.shape[0] // source.batch_size)
                key = jax.device_put(keys[i], _sharding_of(one))
                states[i], out = program(one, images, labels, key)
                outputs.append(_split_output(out))
            if not placed.pool:
                return (*outputs[0], num_steps)
            losses, per_example = zip(*outputs, strict=True)
            return losses, (None if per_example[0] is None else per_example), num_steps

        return run_arrays

    programs = _step_programs(step)
    shared = not source.per_model

    def run_batches(epoch, keys):
        totals, count, start_batch, num_steps = 0.0, 0, 0, 0
        resume = {}
        if within is not None:
            start_batch, totals, count = within.resume_point()
            resume = {"start_batch": start_batch} if start_batch else {}
        if shared:
            streams = [source.epoch_batches(epoch, None, **resume)]
        else:
            streams = [source.epoch_batches(epoch, k, **resume) for k in keys]
        for b, batches in enumerate(zip(*streams, strict=True), start=start_batch):
            if within is not None and b > start_batch and b % within.every == 0:
                within.save(epoch, b, totals, count)
            size = batches[0][0].shape[0]
            if placed.vmapped:
                batch = batches[0] if shared else jax.tree.map(lambda *x: jnp.stack(x), *batches)
                batch = _DataBeside.put(batch, states[0])
                program = programs.pool_shared if shared else programs.pool_each
                states[0], out = program(states[0], *batch)
                loss = _split_output(out)[0]
            else:
                losses = []
                for i, one in enumerate(states):
                    batch = _DataBeside.near(batches[0 if shared else i], one)
                    states[i], out = programs.one(one, *batch)
                    losses.append(_split_output(out)[0])
                loss = jnp.stack(losses) if placed.pool else losses[0]
            totals = totals + loss * size
            count += size
            num_steps += 1
            if within is not None:
                within.done += 1
        return totals / count, None, num_steps

    return run_batches


class _DataBeside:
    """Arrays placed beside a state, once per placement (replicated over a pool's mesh)."""

    def __init__(self, arrays):
        self.arrays, self.cache = arrays, {}

    def beside(self, state: TrainState):
        where = _sharding_of(state)
        if where not in self.cache:
            self.cache[where] = self.put(self.arrays, state)
        return self.cache[where]

    @classmethod
    def near(cls, batch, state: TrainState):
        """``batch`` on ``state``'s devices: as it is when it already lives there (a stream's
        batch sharded over the model's mesh), else :meth:`put` (a looped pool's models live
        on different devices)."""
        images = batch[0]
        if isinstance(images, jax.Array):
            if images.sharding.device_set == _sharding_of(state).device_set:
                return batch
        return cls.put(batch, state)

    @staticmethod
    def put(arrays, state: TrainState):
        where = _sharding_of(state)
        if isinstance(where, jax.sharding.NamedSharding):
            return sharding.replicate(arrays, where.mesh)
        return sharding.put(arrays, where)


class _StepPrograms(NamedTuple):
    one: Callable  # one model, donating its state
    pool_shared: Callable  # a stacked pool, one batch for all models
    pool_each: Callable  # a stacked pool, one batch per model (leading K axis)


# Cached on the step so that repeated runs with one step (a second group of experts, a second
# KD student run, a resumed teacher) reuse the compiled programs instead of tracing anew.
@functools.lru_cache(maxsize=16)
def _step_programs(step) -> _StepPrograms:
    return _StepPrograms(
        one=xla.jit(step, donate_argnums=0),
        pool_shared=xla.jit(jax.vmap(step, in_axes=(0, None, None, None)), donate_argnums=0),
        pool_each=xla.jit(jax.vmap(step), donate_argnums=0),
    )


@functools.lru_cache(maxsize=16)
def _epoch_program(step, batch_size: int, form: str):
    """A whole-epoch program: ``'pool'`` vmapped, ``'one'`` one model, ``'loop'`` Python loop."""
    if form == "pool":
        return make_pool_epoch(step, batch_size)
    if form == "one":
        return xla.jit(make_epoch(step, batch_size), donate_argnums=(0,))
    return make_loop_epoch(step, batch_size)


def fit_pool(
    state: TrainState,
    step,
    images,
    labels,
    key: Array,
    epochs: int,
    batch_size: int,
    lr_schedule: Callable[[int], float] | None = None,
    reset_optimizer_at: Sequence[int] = (),
    tx: optax.GradientTransformation | None = None,
    progress: str | None = None,
    pool_mode: str = "auto",
    log: Callable[..., None] | None = None,
    stage: str | None = None,
) -> tuple[TrainState, np.ndarray]:
    """Trains a pool of models on in-memory arrays: :func:`train_epochs` on an :class:`ArraySource`.

    Args:
      state: pool-stacked :class:`TrainState` (from :func:`init_pool`).
      step: from :func:`make_train_step` (per-example outputs of a ``with_correct``
        step are dropped).
      images, labels: the training data, shared by all models.
      key: the models' keys are ``jax.random.split(fold_in(key, epoch), K)``.
      epochs: number of epochs.
      batch_size: minibatch size.
      lr_schedule, reset_optimizer_at, tx, progress, pool_mode, log, stage: as in
        :func:`train_epochs`.

    Returns:
      The trained state and the mean training loss per epoch, shape ``(epochs, K)``.
    """
    return train_epochs(
        state,
        step,
        ArraySource(images, labels, batch_size),
        epochs=epochs,
        epoch_keys=pool_epoch_keys(key, _num_models(state)),
        pool_mode=pool_mode,
        lr_schedule=lr_schedule,
        reset_optimizer_at=reset_optimizer_at,
        tx=tx,
        progress=progress,
        log=log,
        stage=stage,
    )


def fit(state: TrainState, step, images, labels, key: Array, epochs: int, batch_size: int, **kw):
    """Trains one model: :func:`fit_pool` with a pool of one.

    Args:
      state: an unstacked :class:`TrainState` (from :func:`init_state`).
      step, images, labels, key, epochs, batch_size, **kw: as in :func:`fit_pool`.

    Returns:
      The trained state and the mean training loss per epoch, shape ``(epochs,)``.
    """
    pool = jax.tree.map(lambda x: jnp.asarray(x)[None], state)
    pool, history = fit_pool(pool, step, images, labels, key, epochs, batch_size, **kw)
    return jax.tree.map(lambda x: x[0], pool), history[:, 0]
