"""Training: one pure step, epochs as ``lax.scan``, pools of models by ``vmap``.

Everything that trains a network in ddjax -- evaluation of a synthetic set,
expert trajectories, the SRe2L teacher, feature extractors for coresets --
goes through :func:`make_train_step`. The step is a pure function

    (state, images, labels, key) -> (state, loss)

where ``state`` is a :class:`TrainState` of plain pytrees (params, BatchNorm
statistics, optax state). An *epoch* is a shuffled pass in minibatches
(``lax.scan`` over the full batches, plus one step on the remainder, as a
PyTorch ``DataLoader`` with ``drop_last=False`` does). A *pool* of K models is
the same epoch under ``jax.vmap`` with one key per model; when several devices
exist the pool axis is sharded over the mesh (``ddjax.sharding``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ddjax import checkpoint, sharding
from ddjax.errors import check

Array = jax.Array
Augment = Callable[[Array, Array], Array]


class TrainState(NamedTuple):
    """The state of one network in training (a pytree; vmap adds a leading model axis).

    Attributes:
      params: the ``params`` collection.
      batch_stats: the ``batch_stats`` collection (``{}`` for models without BatchNorm).
      opt_state: the optax state.
    """

    params: Any
    batch_stats: Any
    opt_state: Any


def sgd(learning_rate: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """SGD with PyTorch's semantics, learning rate injected as a state hyper-parameter.

    PyTorch adds ``weight_decay * p`` to the gradient *before* momentum, keeps
    ``buf = momentum * buf + g`` (the first step's buffer is ``g``) and applies
    ``p -= lr * buf`` -- exactly ``add_decayed_weights`` then optax's ``trace``.
    The learning rate lives in ``opt_state.hyperparams['learning_rate']`` so that
    schedules, learned rates and decays change it without recompiling.
    """

    def build(learning_rate, momentum, weight_decay):
        parts = []
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay))
        parts.append(optax.sgd(learning_rate, momentum=momentum or None))
        return optax.chain(*parts)

    return optax.inject_hyperparams(build, static_args=("momentum", "weight_decay"))(
        learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay
    )


def set_learning_rate(opt_state, learning_rate) -> Any:
    """Returns ``opt_state`` (of :func:`sgd`, possibly pool-stacked) with a new learning rate."""
    lr = opt_state.hyperparams["learning_rate"]
    new = dict(opt_state.hyperparams, learning_rate=jnp.full_like(lr, learning_rate))
    return opt_state._replace(hyperparams=new)


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean cross-entropy with hard labels ``(N,)`` or target probabilities ``(N, C)``."""
    if labels.ndim == 1:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return optax.softmax_cross_entropy(logits, labels).mean()


def init_state(model, tx: optax.GradientTransformation, key: Array, image_shape) -> TrainState:
    """Initialises a network (PyTorch-default init) and its optimiser state."""
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(params, batch_stats, tx.init(params))


def init_pool(model, tx, key: Array, image_shape, num_models: int, mesh=None) -> TrainState:
    """Initialises ``num_models`` independent networks stacked on a leading axis.

    Model ``i`` is initialised from ``jax.random.split(key, num_models)[i]``, so
    the pool equals the models initialised one by one. With a ``mesh`` the pool
    axis is sharded over its ``pool`` axis.
    """
    keys = jax.random.split(key, num_models)
    init = jax.vmap(lambda k: init_state(model, tx, k, image_shape))
    if mesh is None:
        return jax.jit(init)(keys)
    return jax.jit(init, out_shardings=sharding.pool_sharding(mesh))(keys)


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    augment: Augment | None = None,
    loss_fn: Callable[[Array, Array], Array] = cross_entropy,
    with_correct: bool = False,
):
    """Builds the pure train step ``(state, images, labels, key) -> (state, loss)``.

    Args:
      model: a Flax Linen module with ``__call__(x, train)``.
      tx: the optax optimiser (e.g. :func:`sgd`).
      augment: ``augment(key, images) -> images`` applied to every batch
        (``ddjax.augment.make_augment``), or ``None``.
      loss_fn: ``loss_fn(logits, labels) -> scalar``.
      with_correct: if true the step returns ``(state, (loss, correct))`` where
        ``correct`` (bool, ``(B,)``) says whether each example of the batch was
        classified correctly by the forward pass the gradient came from (on the
        augmented images, before the update) -- what forgetting statistics
        (Toneva et al. 2019) record, at no extra cost. Soft labels count as
        their arg-max class.
    """

    def step(state: TrainState, images: Array, labels: Array, key: Array):
        if augment is not None:
            images = augment(key, images)

        def objective(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
                logits, updates = model.apply(
                    variables, images, train=True, mutable=["batch_stats"]
                )
                return loss_fn(logits, labels), (updates["batch_stats"], logits)
            logits = model.apply(variables, images, train=True)
            return loss_fn(logits, labels), (state.batch_stats, logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        state = TrainState(params, batch_stats, opt_state)
        if not with_correct:
            return state, loss
        classes = labels if labels.ndim == 1 else jnp.argmax(labels, -1)
        return state, (loss, jnp.argmax(logits, -1) == classes)

    return step


def make_epoch(step, batch_size: int):
    """Builds ``epoch(state, images, labels, key) -> (state, mean_loss)`` for one model.

    The data is reshuffled with ``key``; full batches run under ``lax.scan`` and a
    smaller last batch (if any) runs once more, like PyTorch's ``DataLoader``
    with ``shuffle=True, drop_last=False``. Shapes are static, so one epoch
    function compiles once per dataset size.

    A step that returns ``(loss, per_example)`` (``make_train_step(...,
    with_correct=True)``) gives ``epoch -> (state, (mean_loss, per_example))``
    with ``per_example`` of shape ``(n, ...)`` in the data's order: every
    example is in exactly one batch of an epoch.
    """

    def epoch(state: TrainState, images: Array, labels: Array, key: Array):
        n = images.shape[0]
        num_full, tail = divmod(n, batch_size)
        perm_key, step_key = jax.random.split(key)
        perm = jax.random.permutation(perm_key, n)
        keys = jax.random.split(step_key, num_full + (tail > 0))
        losses, per_example = [], []
        if num_full:

            def body(state, xs):
                index, k = xs
                return step(state, images[index], labels[index], k)

            batches = perm[: num_full * batch_size].reshape(num_full, batch_size)
            state, out = jax.lax.scan(body, state, (batches, keys[:num_full]))
            full_losses, full_examples = _split_output(out)
            losses.append(full_losses * batch_size)
            if full_examples is not None:  # (num_full, batch_size, ...) -> (num_full * b, ...)
                full_examples = full_examples.reshape(-1, *full_examples.shape[2:])
            per_example.append(full_examples)
        if tail:
            index = perm[num_full * batch_size :]
            state, out = step(state, images[index], labels[index], keys[-1])
            tail_loss, tail_examples = _split_output(out)
            losses.append(tail_loss[None] * tail)
            per_example.append(tail_examples)
        mean_loss = jnp.concatenate(losses).sum() / n
        if per_example[0] is None:
            return state, mean_loss
        return state, (mean_loss, _in_data_order(perm, per_example))

    return epoch


def _split_output(out):
    """A step's second output as ``(loss, per_example or None)``."""
    return out if isinstance(out, tuple) else (out, None)


def _in_data_order(perm: Array, per_example: Sequence[Array]) -> Array:
    """Per-example outputs of an epoch's batches, in ``perm`` order, put back in data order."""
    in_batch_order = jnp.concatenate(per_example)
    return jnp.zeros_like(in_batch_order).at[perm].set(in_batch_order)


POOL_MODES = ("auto", "vmap", "loop")


def resolve_pool_mode(mode: str) -> str:
    """``'auto'`` is ``'vmap'`` on GPU/TPU and ``'loop'`` on CPU.

    Two facts about XLA:CPU (jax 0.10.2, measured in
    ``benchmarks/eval_throughput.py``) decide the CPU form:

    * ``vmap`` over networks turns every convolution into a grouped
      convolution (one group per model), and a batched DSA group choice runs
      all six groups; XLA:CPU runs the vmapped pool several times slower per
      model than one model at a time.
    * A convolution step inside a *rolled* loop (``lax.scan``/``lax.map``)
      runs about 10x slower than the same step outside a loop.

    So on CPU a pool is trained one model after another, each epoch a Python
    loop over jitted minibatch steps (dispatch costs microseconds against
    milliseconds of compute). On accelerators the pool is one vmapped program
    whose epoch is a ``lax.scan``. Both give the same numbers (tested).
    """
    check(mode in POOL_MODES, f"pool_mode={mode!r} is not known; valid: {list(POOL_MODES)}")
    if mode == "auto":
        return "loop" if jax.default_backend() == "cpu" else "vmap"
    return mode


def make_pool_epoch(step, batch_size: int):
    """``make_epoch`` vmapped over a leading model axis, jitted, donating the state.

    Returns ``pool_epoch(state, images, labels, keys) -> (state, losses)``. The
    data is shared by all models; model ``i`` shuffles and augments with
    ``keys[i]``, exactly as if the models were trained one after another.
    A pool-sharded state (``ddjax.sharding.shard_pool``) stays sharded: each
    device trains its own models.
    """
    epoch = make_epoch(step, batch_size)
    return jax.jit(jax.vmap(epoch, in_axes=(0, None, None, 0)), donate_argnums=(0,))


def make_loop_epoch(step, batch_size: int):
    """The same epoch as :func:`make_epoch` as a Python loop over jitted steps.

    Returns ``epoch(state, images, labels, key) -> (state, mean_loss)`` for one
    model (``(state, (mean_loss, per_example))`` for a step with per-example
    outputs, as in :func:`make_epoch`). The permutation, the batches and the
    per-step keys are derived from ``key`` exactly as in :func:`make_epoch`, so
    both forms train identically.
    """

    @functools.partial(jax.jit, donate_argnums=(0,))
    def indexed_step(state, images, labels, index, key):
        return step(state, images[index], labels[index], key)

    def epoch(state, images, labels, key):
        n = images.shape[0]
        num_full, tail = divmod(n, batch_size)
        perm, step_key = _shuffle(key, labels)
        keys = jax.random.split(step_key, num_full + (tail > 0))
        total = 0.0
        per_example = []
        for b in range(num_full + (tail > 0)):
            index = perm[b * batch_size : (b + 1) * batch_size]
            state, out = indexed_step(state, images, labels, index, keys[b])
            loss, examples = _split_output(out)
            total = total + loss * index.shape[0]
            per_example.append(examples)
        if per_example[0] is None:
            return state, total / n
        return state, (total / n, in_data_order(perm, per_example))

    in_data_order = jax.jit(_in_data_order)
    return epoch


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


@jax.jit
def _shuffle(key: Array, labels: Array) -> tuple[Array, Array]:
    """An epoch's ``(permutation, step_key)``, as :func:`make_epoch` draws them from ``key``."""
    perm_key, step_key = jax.random.split(key)
    return jax.random.permutation(perm_key, labels.shape[0]), step_key


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
    """

    images: Any
    labels: Any
    batch_size: int
    per_model: bool = dataclasses.field(default=True, init=False)

    def epoch_batches(self, epoch: int, key: Array | None) -> Iterator[Batch]:
        n = self.images.shape[0]
        num_full, tail = divmod(n, self.batch_size)
        perm, step_key = _shuffle(key, self.labels)
        keys = jax.random.split(step_key, num_full + (tail > 0))
        for b in range(num_full + (tail > 0)):
            index = perm[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[index], self.labels[index], keys[b]


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
    progress: str | None = None,
    stop_after_epochs: int | None = None,
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
      progress: description of a progress bar over epochs (``None``: none; silent when
        stderr is not a terminal).
      stop_after_epochs: testing hook, the kill of a test: return ``None`` after this many
        epochs of this call, after their ``on_epoch`` and checkpoint.

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
    mode = resolve_pool_mode(pool_mode)
    start = 0
    if checkpoints is not None and checkpoints.latest_step() is not None:
        start = checkpoints.latest_step()
        check(start <= epochs, f"checkpoint {checkpoints.directory} is at epoch {start} > {epochs}")
        like = {"state": checkpoint.abstract_like(state), "record": record}
        restored = checkpoints.restore(start, like)
        state = TrainState(*restored["state"])
        if record is not None:
            record.update(jax.tree.map(np.array, restored["record"]))  # writable host copies
    placed = _Placed(state, pool, mode)
    run_epoch = _epoch_runner(step, source, placed)
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
    for count, epoch in enumerate(bar, start=1):
        keys = epoch_keys(epoch) if epoch_keys is not None else None
        placed.prepare(epoch, lr_schedule, reset_optimizer_at, tx)
        loss, per_example = run_epoch(epoch, keys)
        history.append(loss)
        postfix = None
        if on_epoch is not None:
            loss_host, per_example = jax.device_get((loss, per_example))  # one sync for all
            if isinstance(per_example, tuple | list):  # a looped pool: one array per model
                per_example = np.stack(per_example)
            outputs = EpochOutputs(np.asarray(loss_host), per_example)
            postfix = on_epoch(epoch, placed.gathered(), outputs)
        if postfix is None and (epoch % 10 == 0 or epoch + 1 == epochs):
            postfix = {"loss": f"{float(np.mean(jax.device_get(loss))):.4f}"}
        if postfix is not None:
            bar.set_postfix(**postfix)
        last = epoch + 1 == epochs
        if checkpoints is not None and (
            ((epoch + 1) % checkpoint_every == 0 and not last) or (last and checkpoint_final)
        ):
            state_host = jax.tree.map(np.asarray, jax.device_get(placed.gathered()))
            checkpoints.save(epoch + 1, {"state": state_host, "record": record})
        if stop_after_epochs is not None and count >= stop_after_epochs:
            bar.close()
            return None
    bar.close()
    losses = np.asarray(jax.device_get(history), np.float32)
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

    def gathered(self) -> TrainState:
        """The state in the form it was given (a looped pool stacked again)."""
        if self.pool and self.mode == "loop":
            return _stack(self.states, self.like)
        return self.states[0]


def _epoch_runner(step, source: BatchSource, placed: _Placed):
    """``run(epoch, keys) -> (loss, per_example)``: one epoch of ``placed``'s models.

    An :class:`ArraySource` runs as compiled whole-epoch programs; other sources feed their
    batches to the jitted step (vmapped over the pool with shared or per-model batches).
    Outputs stay on the devices (no sync), so looped devices run side by side.
    """
    states = placed.states
    if isinstance(source, ArraySource):
        form = "pool" if placed.vmapped else ("one" if placed.mode == "vmap" else "loop")
        program = _epoch_program(step, source.batch_size, form)
        data = _DataBeside((source.images, source.labels))

        def run_arrays(epoch, keys):
            if form != "loop":
                images, labels = data.beside(states[0])
                one_key = keys if placed.vmapped else keys[0]
                states[0], out = program(states[0], images, labels, one_key)
                return _split_output(out)
            outputs = []
            for i, one in enumerate(states):
                images, labels = data.beside(one)
                key = jax.device_put(keys[i], _sharding_of(one))
                states[i], out = program(one, images, labels, key)
                outputs.append(_split_output(out))
            if not placed.pool:
                return outputs[0]
            losses, per_example = zip(*outputs, strict=True)
            return losses, (None if per_example[0] is None else per_example)

        return run_arrays

    programs = _step_programs(step)
    shared = not source.per_model

    def run_batches(epoch, keys):
        totals, count = 0.0, 0
        if shared:
            streams = [source.epoch_batches(epoch, None)]
        else:
            streams = [source.epoch_batches(epoch, k) for k in keys]
        for batches in zip(*streams, strict=True):
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
                    states[i], out = programs.one(one, *batches[0 if shared else i])
                    losses.append(_split_output(out)[0])
                loss = jnp.stack(losses) if placed.pool else losses[0]
            totals = totals + loss * size
            count += size
        return totals / count, None

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

    @staticmethod
    def put(arrays, state: TrainState):
        where = _sharding_of(state)
        if isinstance(where, jax.sharding.NamedSharding):
            return sharding.replicate(arrays, where.mesh)
        return jax.device_put(arrays, where)


def _sharding_of(state: TrainState):
    return jax.tree.leaves(state.params)[0].sharding


class _StepPrograms(NamedTuple):
    one: Callable  # one model, donating its state
    pool_shared: Callable  # a stacked pool, one batch for all models
    pool_each: Callable  # a stacked pool, one batch per model (leading K axis)


# Cached on the step so that repeated runs with one step (a second group of experts, a second
# KD student run, a resumed teacher) reuse the compiled programs instead of tracing anew.
@functools.lru_cache(maxsize=16)
def _step_programs(step) -> _StepPrograms:
    return _StepPrograms(
        one=jax.jit(step, donate_argnums=0),
        pool_shared=jax.jit(jax.vmap(step, in_axes=(0, None, None, None)), donate_argnums=0),
        pool_each=jax.jit(jax.vmap(step), donate_argnums=0),
    )


@functools.lru_cache(maxsize=16)
def _epoch_program(step, batch_size: int, form: str):
    """A whole-epoch program: ``'pool'`` vmapped, ``'one'`` one model, ``'loop'`` Python loop."""
    if form == "pool":
        return make_pool_epoch(step, batch_size)
    if form == "one":
        return jax.jit(make_epoch(step, batch_size), donate_argnums=(0,))
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
      lr_schedule, reset_optimizer_at, tx, progress, pool_mode: as in :func:`train_epochs`.

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


def _take(pool: TrainState, i: int) -> TrainState:
    """Model ``i`` of a pool, placed on a device that holds its shard."""

    def take(x):
        device = _device_of(x, i)
        return jax.device_put(x[i], device)

    return jax.tree.map(take, pool)


def _device_of(x, i: int):
    """The device holding row ``i`` of a pool-sharded array (any device of a replicated one)."""
    for shard in x.addressable_shards:
        rows = shard.index[0] if shard.index else slice(None)
        start, stop, _ = rows.indices(x.shape[0])
        if start <= i < stop:
            return shard.device
    return list(x.devices())[0]


def _stack(states: list[TrainState], like: TrainState) -> TrainState:
    """Stacks per-model states back into a pool with ``like``'s shardings."""
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)
    return jax.tree.map(lambda s, o: jax.device_put(s, o.sharding), stacked, like)


def _like(new_tree, old_tree):
    """Puts ``new_tree``'s leaves on the shardings of ``old_tree``'s (keeps a pool sharded)."""
    return jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), new_tree, old_tree)


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def make_predict(model, batch_size: int = 500):
    """Builds ``predict(params, batch_stats, images) -> logits`` in inference mode, in chunks."""

    def predict(params, batch_stats, images):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        n = images.shape[0]
        num_full, tail = divmod(n, batch_size)
        outputs = []
        if num_full:
            chunks = images[: num_full * batch_size].reshape(
                num_full, batch_size, *images.shape[1:]
            )
            logits = jax.lax.map(lambda x: model.apply(variables, x, train=False), chunks)
            outputs.append(logits.reshape(num_full * batch_size, -1))
        if tail:
            outputs.append(model.apply(variables, images[num_full * batch_size :], train=False))
        return jnp.concatenate(outputs)

    return predict


def pool_accuracy(
    model, state: TrainState, images, labels, num_classes: int, batch_size=500, pool_mode="auto"
):
    """Test accuracy of every model of a pool: the one accuracy of ddjax.

    The test set is scored in chunks of ``batch_size`` by a Python loop of one jitted program
    (vmapped over the pool in ``'vmap'`` mode; model after model, each on its device, in
    ``'loop'`` mode): a convolution inside a rolled loop is slow on XLA:CPU
    (:func:`resolve_pool_mode`). Correct predictions are counted exactly, and accuracies are
    ``count / size`` rounded once to float32.

    Args:
      model, state: the architecture and the pool-stacked trained state.
      images, labels: the test set.
      num_classes: number of classes.
      batch_size: inference chunk size.
      pool_mode: ``'vmap'``, ``'loop'`` or ``'auto'`` (see :func:`resolve_pool_mode`).

    Returns:
      ``(accuracy (K,), per_class_accuracy (K, num_classes))`` as float32 NumPy arrays.
    """
    vmapped = resolve_pool_mode(pool_mode) == "vmap"
    count = _count_correct(model, num_classes, vmapped)
    n = len(labels)
    states = [state] if vmapped else [_take(state, i) for i in range(_num_models(state))]
    totals = []
    for one in states:
        device = _sharding_of(one)
        if isinstance(device, jax.sharding.NamedSharding):
            test = sharding.replicate((images, labels), device.mesh)
        else:
            test = jax.device_put((images, labels), device)
        total = 0
        for start in range(0, n, batch_size):
            chunk = (test[0][start : start + batch_size], test[1][start : start + batch_size])
            total = total + count(one.params, one.batch_stats, *chunk)
        totals.append(total)
    per_class = np.asarray(jax.device_get(totals), np.float64).reshape(-1, num_classes)
    class_sizes = np.maximum(np.bincount(np.asarray(labels), minlength=num_classes), 1)
    accuracy = (per_class.sum(1) / n).astype(np.float32)
    return accuracy, (per_class / class_sizes).astype(np.float32)


def _num_models(pool: TrainState) -> int:
    return jax.tree.leaves(pool.params)[0].shape[0]


@functools.lru_cache(maxsize=16)
def _count_correct(model, num_classes: int, vmapped: bool):
    """``(params, batch_stats, images, labels) -> correct per class`` in inference mode, jitted."""

    def count(params, batch_stats, images, labels):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits = model.apply(variables, images, train=False)
        correct = jnp.argmax(logits, -1) == labels
        return jnp.sum(jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * correct[:, None], 0)

    return jax.jit(jax.vmap(count, in_axes=(0, 0, None, None)) if vmapped else count)
