"""The pure train step, its epochs as compiled programs, pools of models, test accuracy.

Everything that trains a network in ddjax goes through :func:`make_train_step`, a pure
function ``(state, images, labels, key) -> (state, loss)`` over a :class:`TrainState` of plain
pytrees (params, BatchNorm statistics, optax state). An *epoch* of in-memory data is a shuffled
pass in minibatches (:func:`make_epoch`: ``lax.scan`` over the full batches, plus one step on
the remainder, as a PyTorch ``DataLoader`` with ``drop_last=False``; :func:`make_loop_epoch`:
the same batches as a Python loop of jitted steps). A *pool* of K models is the same epoch
under ``jax.vmap`` with one key per model (:func:`make_pool_epoch`); where a pool runs is
decided by :func:`resolve_pool_mode`. The epoch loop around these programs is
:func:`ddjax.train.driver.train_epochs`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddjax import distributed, guard, sharding, xla
from ddjax.errors import check

Array = jax.Array
Augment = Callable[[Array, Array], Array]


class TrainState(NamedTuple):
    """The state of one network in training (a pytree; vmap adds a leading model axis).

    Attributes:
      params: the ``params`` collection.
      batch_stats: the ``batch_stats`` collection (``{}`` for models without BatchNorm).
      opt_state: the optax state.
      skips: the :class:`ddjax.guard.Skips` counters of updates the guard refused (a step
        whose loss or new state is not finite keeps the old state; :mod:`ddjax.guard`).
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    skips: Any = guard.no_skips()


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


def init_state(
    model, tx: optax.GradientTransformation, key: Array, image_shape, dtype=None
) -> TrainState:
    """Initialises a network (PyTorch-default init) and its optimiser state.

    ``dtype`` (e.g. ``jnp.float64``): the floating-point parameters and BatchNorm statistics
    are cast to it before the optimiser state is made (``None``: the model's own, float32 or,
    under ``jax_enable_x64``, float64; see :func:`ddjax.models.float_dtype`).
    """
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if dtype is not None:
        params, batch_stats = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            (params, batch_stats),
        )
    # The counters as arrays, like the step's output: a jitted step compiles once.
    skips = guard.Skips(*jnp.zeros((2,), jnp.int32))
    return TrainState(params, batch_stats, tx.init(params), skips)


def init_pool(
    model, tx, key: Array, image_shape, num_models: int, mesh=None, dtype=None
) -> TrainState:
    """Initialises ``num_models`` independent networks stacked on a leading axis.

    Model ``i`` is initialised from ``jax.random.split(key, num_models)[i]``, so
    the pool equals the models initialised one by one. With a ``mesh`` the pool
    axis is sharded over its ``pool`` axis. ``dtype``: as in :func:`init_state`.
    """
    keys = jax.random.split(key, num_models)
    init = jax.vmap(lambda k: init_state(model, tx, k, image_shape, dtype))
    if mesh is None:
        return jax.jit(init)(keys)
    return jax.jit(init, out_shardings=sharding.pool_sharding(mesh))(keys)


#: ``fold_in`` constant of the dropout key, apart from the batch's augmentation key.
DROPOUT_STREAM = 0x64726F70


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    augment: Augment | None = None,
    loss_fn: Callable[[Array, Array], Array] = cross_entropy,
    with_correct: bool = False,
    accumulate: int = 1,
):
    """Builds the pure train step ``(state, images, labels, key) -> (state, loss)``.

    **The guard** (:mod:`ddjax.guard`): the update is applied only if the loss and every
    floating leaf of the new state (parameters, BatchNorm statistics, optimiser state) are
    finite; otherwise the state is kept as it was and ``state.skips`` counts the skip. The
    returned loss is the one computed (non-finite for such a step).

    **Gradient accumulation** (``accumulate = A > 1``): the batch of ``B`` examples (after
    ``augment``, which sees the whole batch) is cut into micro-batches of
    ``m = ceil(B / A)`` examples -- ``B // m`` full ones and, when ``m`` does not divide ``B``,
    one more with the ``B mod m`` last examples (never more than ``A`` in all; no example is
    dropped) -- and their gradients are summed with weights ``size / B`` before *one*
    optimiser update. For a loss that is a mean over the batch (cross-entropy, KD's
    ``batchmean`` KL) that is the whole batch's gradient, so the update is the one the whole
    batch would give, up to float rounding -- for models without BatchNorm. Full micro-batch
    ``j`` holds examples ``j, j + B//m, j + 2·(B//m), ...`` (strided, so that in a batch split
    over devices every micro-batch is split over all of them); the full ones run under one
    ``lax.scan``, so the compiled step holds one micro-batch's activations at a time, and the
    step compiles once per batch size. The returned loss is the same weighted sum (the
    batch's mean loss).

    **BatchNorm under accumulation** normalises each micro-batch with that micro-batch's own
    statistics and updates the running statistics once per micro-batch, in turn -- what
    PyTorch does when a loop of ``A`` forward/backward passes precedes one ``optimizer.step()``
    -- so a BatchNorm model's update differs from the whole batch's. Dropout draws a
    different key per micro-batch (``fold_in(dropout_key, j)``).

    Args:
      model: a Flax Linen module with ``__call__(x, train)``.
      tx: the optax optimiser (e.g. :func:`sgd`).
      augment: ``augment(key, images) -> images`` applied to every batch
        (``ddjax.augment.make_augment``), or ``None``.
      loss_fn: ``loss_fn(logits, labels) -> scalar``, a mean over the batch when
        ``accumulate > 1``.
      with_correct: if true the step returns ``(state, (loss, correct))`` where
        ``correct`` (bool, ``(B,)``) says whether each example of the batch was
        classified correctly by the forward pass the gradient came from (on the
        augmented images, before the update) -- what forgetting statistics
        (Toneva et al. 2019) record, at no extra cost. Soft labels count as
        their arg-max class.
      accumulate: ``A``, the number of micro-batches per update (1: none).
    """
    check(
        isinstance(accumulate, int) and not isinstance(accumulate, bool) and accumulate >= 1,
        f"accumulate={accumulate!r} must be a positive integer (micro-batches per update)",
    )

    def gradients(params, batch_stats, images: Array, labels: Array, rngs: dict):
        """``(loss, grads, batch_stats, logits)`` of one (micro-)batch, in train mode."""

        def objective(params):
            variables = {"params": params}
            if batch_stats:
                variables["batch_stats"] = batch_stats
                logits, updates = model.apply(
                    variables, images, train=True, mutable=["batch_stats"], rngs=rngs
                )
                return loss_fn(logits, labels), (updates["batch_stats"], logits)
            logits = model.apply(variables, images, train=True, rngs=rngs)
            return loss_fn(logits, labels), (batch_stats, logits)

        (loss, (new_stats, logits)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return loss, grads, new_stats, logits

    def step(state: TrainState, images: Array, labels: Array, key: Array):
        if augment is not None:
            images = augment(key, images)
        # Models with dropout (MobileNet-V2) draw it from this stream; others ignore it.
        dropout = None if key is None else jax.random.fold_in(key, DROPOUT_STREAM)
        if accumulate == 1:
            rngs = {} if dropout is None else {"dropout": dropout}
            loss, grads, batch_stats, logits = gradients(
                state.params, state.batch_stats, images, labels, rngs
            )
            predicted = jnp.argmax(logits, -1) if with_correct else None
        else:
            loss, grads, batch_stats, predicted = _accumulated_gradients(
                gradients, state, images, labels, dropout, accumulate, with_correct
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The guard: a non-finite loss or new state keeps the old one (counted as skipped).
        kept, accepted = guard.guard(
            (params, batch_stats, opt_state),
            (state.params, state.batch_stats, state.opt_state),
            loss,
        )
        state = TrainState(*kept, guard.count(state.skips, accepted))
        if not with_correct:
            return state, loss
        classes = labels if labels.ndim == 1 else jnp.argmax(labels, -1)
        return state, (loss, predicted == classes)

    return step


def micro_batch_sizes(batch_size: int, accumulate: int) -> list[int]:
    """The micro-batch sizes :func:`make_train_step` cuts a batch of ``batch_size`` into.

    ``B // m`` micro-batches of ``m = ceil(B / A)`` examples, then one of ``B mod m`` when it
    is not zero: e.g. ``B = 10, A = 4`` gives ``[3, 3, 3, 1]``; ``B = 9, A = 4`` gives
    ``[3, 3, 3]``.
    """
    size = -(-batch_size // accumulate)
    full, tail = divmod(batch_size, size)
    return [size] * full + ([tail] if tail else [])


def _accumulated_gradients(gradients, state, images, labels, dropout, accumulate, predictions):
    """``(loss, grads, batch_stats, predicted)`` of a batch as micro-batches (see the step)."""
    total = images.shape[0]
    sizes = micro_batch_sizes(total, accumulate)
    size, full = sizes[0], total // sizes[0]
    params = state.params

    def micro(batch_stats, images, labels, index):
        rngs = {} if dropout is None else {"dropout": jax.random.fold_in(dropout, index)}
        loss, grads, new_stats, logits = gradients(params, batch_stats, images, labels, rngs)
        weight = images.shape[0] / total  # the micro-batch's share of the batch mean
        grads = jax.tree.map(lambda g: g * weight, grads)
        # The carry keeps its dtypes (BatchNorm may compute its statistics in another one).
        new_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), new_stats, batch_stats)
        predicted = jnp.argmax(logits, -1) if predictions else None
        return loss * weight, grads, new_stats, predicted

    def strided(x):
        """``x[:full·m]`` as ``(full, m, ...)``, micro-batch ``j`` = ``x[j::full]``."""
        return jnp.swapaxes(x[: full * size].reshape(size, full, *x.shape[1:]), 0, 1)

    def body(carry, xs):
        loss_sum, grad_sum, batch_stats = carry
        loss, grads, batch_stats, predicted = micro(batch_stats, *xs)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads), batch_stats), predicted

    indices = jnp.arange(full)
    xs = (strided(images), strided(labels), indices)
    first = jax.eval_shape(micro, state.batch_stats, *jax.tree.map(lambda x: x[0], xs))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), first[:2])
    (loss, grads, batch_stats), predicted = jax.lax.scan(body, (*zeros, state.batch_stats), xs)
    if predictions:  # back to the batch's order: (full, m) -> (m, full) -> (full·m,)
        predicted = [jnp.swapaxes(predicted, 0, 1).reshape(-1)]
    if len(sizes) > full:  # the uneven rest, one smaller micro-batch
        start = full * size
        rest = micro(batch_stats, images[start:], labels[start:], full)
        loss = loss + rest[0]
        grads = jax.tree.map(jnp.add, grads, rest[1])
        batch_stats = rest[2]
        if predictions:
            predicted.append(rest[3])
    return loss, grads, batch_stats, (jnp.concatenate(predicted) if predictions else None)


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


def resolve_pool_mode(mode: str, pool: bool = True) -> str:
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

    In a multi-process run a pool (``pool=True``) is always ``'vmap'``: one program over
    the global mesh, of which every process runs its part; ``'loop'``'s one model per
    device would need every device to be this process's.
    """
    check(mode in POOL_MODES, f"pool_mode={mode!r} is not known; valid: {list(POOL_MODES)}")
    if mode == "auto":
        spread = pool and jax.process_count() > 1
        return "loop" if jax.default_backend() == "cpu" and not spread else "vmap"
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
    return xla.jit(jax.vmap(epoch, in_axes=(0, None, None, 0)), donate_argnums=(0,))


def make_loop_epoch(step, batch_size: int):
    """The same epoch as :func:`make_epoch` as a Python loop over jitted steps.

    Returns ``epoch(state, images, labels, key) -> (state, mean_loss)`` for one
    model (``(state, (mean_loss, per_example))`` for a step with per-example
    outputs, as in :func:`make_epoch`). The permutation, the batches and the
    per-step keys are derived from ``key`` exactly as in :func:`make_epoch`, so
    both forms train identically.
    """

    @functools.partial(xla.jit, donate_argnums=(0,))
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


@jax.jit
def _shuffle(key: Array, labels: Array) -> tuple[Array, Array]:
    """An epoch's ``(permutation, step_key)``, as :func:`make_epoch` draws them from ``key``."""
    perm_key, step_key = jax.random.split(key)
    return jax.random.permutation(perm_key, labels.shape[0]), step_key


# --------------------------------------------------------------------------------------------
# Pool placement
# --------------------------------------------------------------------------------------------


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
    return jax.tree.map(lambda s, o: sharding.put(s, o.sharding), stacked, like)


def _like(new_tree, old_tree):
    """Puts ``new_tree``'s leaves on the shardings of ``old_tree``'s (keeps a pool sharded)."""
    return jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), new_tree, old_tree)


def _sharding_of(state: TrainState):
    return jax.tree.leaves(state.params)[0].sharding


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
    return accuracy_over(
        model, state, array_chunks(images, labels, batch_size), num_classes, pool_mode
    )


def array_chunks(images, labels, batch_size: int = 500):
    """In-memory test arrays as ``chunks()`` for :func:`accuracy_over` / :func:`scores_over`."""
    n = len(labels)

    def chunks():
        for start in range(0, n, batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]

    return chunks


def accuracy_over(model, state: TrainState, chunks, num_classes: int, pool_mode="auto"):
    """Test accuracy of every model of a pool on the batches ``chunks()`` yields.

    :func:`scores_over` without top-k: ``(accuracy (K,), per_class_accuracy (K, C))``.
    """
    scores = scores_over(model, state, chunks, num_classes, pool_mode)
    return scores.accuracy, scores.per_class


class PoolScores(NamedTuple):
    """Test scores of a pool of K models (float32 NumPy arrays).

    Attributes:
      accuracy: ``(K,)`` top-1 accuracy.
      per_class: ``(K, C)`` top-1 accuracy per class.
      top_k: ``(K,)`` top-k accuracy -- the true class among the k largest logits (equal
        logits: the lower class index first, as for top-1's arg-max) -- or ``None`` when no
        k was asked for.
    """

    accuracy: np.ndarray
    per_class: np.ndarray
    top_k: np.ndarray | None


def scores_over(
    model, state: TrainState, chunks, num_classes: int, pool_mode="auto", top_k: int | None = None
) -> PoolScores:
    """Top-1 (overall and per class) and top-k accuracy of every model of a pool.

    The core of :func:`pool_accuracy`, for any source of test batches (a stream's test split,
    :func:`ddjax.data.stream_test_chunks`): ``chunks()`` yields host ``(images, labels)``
    batches, the same in every process; a label of ``-1`` marks padding, which is not
    counted. ``chunks`` is called once per model of a looped pool. A pool on a mesh with a
    ``data`` axis scores every chunk split over that axis (:func:`ddjax.sharding.shard_batch`).

    Args:
      model, state: the architecture and the pool-stacked state.
      chunks: the test batches.
      num_classes: C.
      pool_mode: ``'vmap'``, ``'loop'`` or ``'auto'`` (see :func:`resolve_pool_mode`).
      top_k: k of the top-k accuracy, at most C (``None``: top-1 only).

    Returns:
      :class:`PoolScores`; counts are exact, accuracies ``count / size`` rounded once to float32.
    """
    check(
        top_k is None or (isinstance(top_k, int) and 1 <= top_k <= num_classes),
        f"top_k={top_k!r} must be an integer in [1, num_classes={num_classes}] or None",
    )
    vmapped = resolve_pool_mode(pool_mode) == "vmap"
    count = _count_correct(model, num_classes, vmapped, top_k)
    states = [state] if vmapped else [_take(state, i) for i in range(_num_models(state))]
    totals, class_sizes = [], np.zeros(num_classes, np.int64)
    for i, one in enumerate(states):
        where = _sharding_of(one)
        total = None
        for images, labels in chunks():
            if i == 0:
                real = np.asarray(labels)
                class_sizes += np.bincount(real[real >= 0], minlength=num_classes)
            if isinstance(where, jax.sharding.NamedSharding):
                chunk = sharding.shard_batch((images, labels), where.mesh)
            else:
                chunk = jax.device_put((images, labels), where)
            counted = count(one.params, one.batch_stats, *chunk)
            total = counted if total is None else jax.tree.map(jnp.add, total, counted)
        totals.append(total)
    per_class, in_top_k = zip(*distributed.to_host(totals), strict=True)
    per_class = np.asarray(per_class, np.float64).reshape(-1, num_classes)
    size = max(class_sizes.sum(), 1)
    accuracy = (per_class.sum(1) / size).astype(np.float32)
    top = None
    if top_k is not None:
        top = (np.asarray(in_top_k, np.float64).reshape(-1) / size).astype(np.float32)
    per_class = (per_class / np.maximum(class_sizes, 1)).astype(np.float32)
    return PoolScores(accuracy, per_class, top)


def _num_models(pool: TrainState) -> int:
    return jax.tree.leaves(pool.params)[0].shape[0]


@functools.lru_cache(maxsize=16)
def _count_correct(model, num_classes: int, vmapped: bool, top_k: int | None = None):
    """``(params, batch_stats, images, labels) -> (correct per class, in top-k)``, jitted.

    Inference mode; a label of -1 (padding) matches no class and is never counted.
    """

    def count(params, batch_stats, images, labels):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits = model.apply(variables, images, train=False)
        correct = jnp.argmax(logits, -1) == labels
        per_class = jnp.sum(
            jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * correct[:, None], 0
        )
        if top_k is None:
            return per_class, jnp.zeros((), jnp.int32)
        _, best = jax.lax.top_k(logits, top_k)  # equal logits: the lower index first
        return per_class, jnp.sum(jnp.any(best == labels[:, None], -1), dtype=jnp.int32)

    return jax.jit(jax.vmap(count, in_axes=(0, 0, None, None)) if vmapped else count)
