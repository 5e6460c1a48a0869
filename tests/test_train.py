"""ddjax.train: the pure step, epochs, pools of models by vmap, PyTorch SGD semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddjax import augment, checkpoint, models, train
from ddjax.errors import DDJaxError


def _data(n=20, size=8, channels=1, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, size, size, channels)).astype(np.float32)
    labels = (np.arange(n) % classes).astype(np.int32)
    return jnp.asarray(images), jnp.asarray(labels)


def test_sgd_matches_pytorch_formula():
    # PyTorch: g += wd * p; buf = mu * buf + g (buf = g at the first step); p -= lr * buf.
    lr, mu, wd = 0.1, 0.9, 0.01
    tx = train.sgd(lr, momentum=mu, weight_decay=wd)
    p = jnp.array([1.0, -2.0])
    state = tx.init(p)
    p_ref, buf = np.array([1.0, -2.0]), None
    for t in range(4):
        g = jnp.array([0.5, 0.25]) * (t + 1)
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        g_ref = np.asarray(g) + wd * p_ref
        buf = g_ref if buf is None else mu * buf + g_ref
        p_ref = p_ref - lr * buf
        np.testing.assert_allclose(np.asarray(p), p_ref, rtol=1e-6)


def test_set_learning_rate_changes_the_step():
    tx = train.sgd(1.0)
    p = jnp.ones(2)
    state = train.set_learning_rate(tx.init(p), 0.5)
    updates, _ = tx.update(jnp.ones(2), state, p)
    np.testing.assert_allclose(np.asarray(updates), [-0.5, -0.5])


def test_epoch_visits_every_example_once_with_a_partial_last_batch():
    # A fake step that counts how often each example index is seen.
    def count_step(state, images, labels, key):
        return state.at[labels].add(1), jnp.float32(labels.shape[0])

    epoch = jax.jit(train.make_epoch(count_step, batch_size=3))
    n = 7  # two full batches of 3 and one of 1, like DataLoader(drop_last=False)
    counts, mean_loss = epoch(
        jnp.zeros(n, jnp.int32), jnp.zeros((n, 1)), jnp.arange(n), jax.random.key(0)
    )
    np.testing.assert_array_equal(np.asarray(counts), np.ones(n))
    # The mean loss is weighted by batch size: (3*3 + 3*3 + 1*1) / 7.
    assert float(mean_loss) == pytest.approx(19 / 7)


def test_epoch_order_depends_on_the_key():
    def order_step(state, images, labels, key):
        return jnp.concatenate([state[labels.shape[0] :], labels]), jnp.float32(0)

    epoch = jax.jit(train.make_epoch(order_step, batch_size=4))
    a, _ = epoch(jnp.zeros(8, jnp.int32), jnp.zeros((8, 1)), jnp.arange(8), jax.random.key(0))
    b, _ = epoch(jnp.zeros(8, jnp.int32), jnp.zeros((8, 1)), jnp.arange(8), jax.random.key(1))
    assert sorted(np.asarray(a).tolist()) == list(range(8))
    assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "name, pool_mode, aug", [("ConvNet", "vmap", "crop_flip"), ("ConvNetBN", "loop", "dsa")]
)
def test_pool_training_equals_training_models_one_by_one(name, pool_mode, aug):
    """In float64 (the networks follow jax_enable_x64): vmap and the loop only reorder sums,
    ~1e-16 relative, which two epochs of momentum SGD grow to ~1e-14 at most; 1e-10 is a margin
    of ~1e4 (float32's ~1e-7 grew to ~1e-5, the old tolerance, and depended on the CPU's
    instruction set). The pool's history is reported in float32: one rounding, 2^-23 relative.
    """
    with jax.enable_x64(True):
        # 20 examples in batches of 8: two full batches and a partial one per epoch.
        images, labels = _data()
        net = models.get_model(name, 3, (8, 8, 1), width=8)
        tx = train.sgd(0.05, momentum=0.9, weight_decay=5e-4)
        # DSA with two groups (of six), in the looped pool: the property is the pool, and DSA
        # vmapped over a pool compiles slowly on CPU (tests/test_evaluate.py vmaps DSA's crop and
        # flip over 8 devices).
        aug_fn = (
            augment.make_augment(aug, "color_rotate") if aug == "dsa" else augment.make_augment(aug)
        )
        step = train.make_train_step(net, tx, aug_fn)
        key = jax.random.key(3)
        num_models, epochs = 3, 2

        pool = train.init_pool(net, tx, key, (8, 8, 1), num_models)
        pool, history = train.fit_pool(
            pool, step, images, labels, key, epochs=epochs, batch_size=8, pool_mode=pool_mode
        )
        assert history.shape == (epochs, num_models)

        epoch = jax.jit(train.make_epoch(step, 8))
        for i, init_key in enumerate(jax.random.split(key, num_models)):
            state = train.init_state(net, tx, init_key, (8, 8, 1))
            for e in range(epochs):
                epoch_key = jax.random.split(jax.random.fold_in(key, e), num_models)[i]
                state, loss = epoch(state, images, labels, epoch_key)
                np.testing.assert_allclose(float(loss), history[e, i], rtol=2**-22)
            one = jax.tree.map(lambda x, i=i: x[i], pool)
            for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(state), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-13)


def test_unknown_pool_mode_is_refused():
    with pytest.raises(DDJaxError, match="pool_mode='pmap'"):
        train.resolve_pool_mode("pmap")


def test_training_reduces_the_loss_and_updates_batch_stats():
    images, labels = _data(n=30)
    net = models.get_model("ConvNetBN", 3, (8, 8, 1), width=8)
    tx = train.sgd(0.05, momentum=0.9)
    step = train.make_train_step(net, tx)
    key = jax.random.key(0)
    pool = train.init_pool(net, tx, key, (8, 8, 1), 2)
    before = jax.tree.map(np.asarray, pool.batch_stats)
    pool, history = train.fit_pool(pool, step, images, labels, key, epochs=30, batch_size=10)
    assert np.all(history[-1] < 0.5 * history[0])
    after = jax.tree.leaves(pool.batch_stats)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), after, strict=True))


def test_optimizer_reset_clears_momentum_and_schedule_sets_lr():
    images, labels = _data(n=8)
    net = models.get_model("ConvNet", 3, (8, 8, 1), width=4)
    tx = train.sgd(0.1, momentum=0.9)
    pool = train.init_pool(net, tx, jax.random.key(0), (8, 8, 1), 2)
    # Fill the momentum buffers, then train with a step that leaves the state alone.
    pool = pool._replace(opt_state=jax.tree.map(jnp.ones_like, pool.opt_state))

    def frozen_step(state, images, labels, key):
        return state, jnp.float32(0)

    pool, _ = train.fit_pool(
        pool,
        frozen_step,
        images,
        labels,
        jax.random.key(1),
        epochs=3,
        batch_size=8,
        lr_schedule=lambda e: 0.1 if e < 2 else 0.01,
        reset_optimizer_at=(2,),
        tx=tx,
    )
    traces = [x for x in jax.tree.leaves(pool.opt_state.inner_state) if x.ndim > 1]
    assert traces and all(float(jnp.abs(t).max()) == 0.0 for t in traces)
    np.testing.assert_allclose(
        np.asarray(pool.opt_state.hyperparams["learning_rate"]), [0.01, 0.01]
    )


def test_soft_labels_cross_entropy_equals_hard_for_one_hot():
    logits = jax.random.normal(jax.random.key(0), (5, 4))
    labels = jnp.array([0, 3, 1, 2, 0])
    hard = train.cross_entropy(logits, labels)
    soft = train.cross_entropy(logits, jax.nn.one_hot(labels, 4))
    np.testing.assert_allclose(float(hard), float(soft), rtol=1e-6)


@pytest.mark.parametrize("pool_mode", ["vmap", "loop"])
def test_pool_accuracy_counts_per_class(pool_mode):
    net = models.get_model("ConvNet", 3, (8, 8, 1), width=4)
    tx = train.sgd(0.1)
    pool = train.init_pool(net, tx, jax.random.key(0), (8, 8, 1), 2)
    images, labels = _data(n=12)
    acc, per_class = train.pool_accuracy(
        net, pool, images, labels, 3, batch_size=5, pool_mode=pool_mode
    )
    predict = train.make_predict(net, batch_size=5)
    for i in range(2):
        one = jax.tree.map(lambda x, i=i: x[i], pool)
        pred = np.argmax(np.asarray(predict(one.params, one.batch_stats, images)), -1)
        assert acc[i] == pytest.approx(np.mean(pred == np.asarray(labels)))
        for c in range(3):
            m = np.asarray(labels) == c
            assert per_class[i, c] == pytest.approx(np.mean(pred[m] == c))


def test_fit_trains_one_model_like_a_pool_of_one():
    # float64: a pool of one may reorder sums (~1e-16 relative, ~1e-14 after three epochs);
    # both histories are rounded once to float32, so they agree to 2^-23 relative.
    images, labels = _data(n=16)
    with jax.enable_x64(True):
        net = models.get_model("ConvNet", 3, (8, 8, 1), width=4)
        tx = train.sgd(0.05, momentum=0.9)
        step = train.make_train_step(net, tx)
        key = jax.random.key(0)
        state = train.init_state(net, tx, key, (8, 8, 1))
        one, history = train.fit(state, step, images, labels, key, epochs=3, batch_size=8)
        assert history.shape == (3,) and history[-1] < history[0]
        pool = jax.tree.map(lambda x: x[None], state)
        pool, pool_history = train.fit_pool(pool, step, images, labels, key, epochs=3, batch_size=8)
    np.testing.assert_allclose(history, pool_history[:, 0], rtol=2**-22)


@pytest.mark.parametrize("form", ["scan", "loop"])
def test_per_example_outputs_come_back_in_data_order(form):
    # A step that tags each example of its batch with its label (here: its index) times 10.
    def tagging_step(state, images, labels, key):
        return state + 1, (jnp.float32(labels.shape[0]), labels * 10)

    make = {"scan": lambda s, b: jax.jit(train.make_epoch(s, b)), "loop": train.make_loop_epoch}
    epoch = make[form](tagging_step, 3)
    steps, (mean_loss, tags) = epoch(
        jnp.int32(0), jnp.zeros((7, 1)), jnp.arange(7), jax.random.key(0)
    )
    assert int(steps) == 3 and float(mean_loss) == pytest.approx(19 / 7)
    np.testing.assert_array_equal(np.asarray(tags), np.arange(7) * 10)


def test_with_correct_reports_the_steps_own_forward_pass_and_trains_the_same():
    images, labels = _data(n=12)
    net = models.get_model("ConvNet", 3, (8, 8, 1), width=4)
    tx = train.sgd(0.1)
    state = train.init_state(net, tx, jax.random.key(0), (8, 8, 1))
    plain = jax.jit(train.make_train_step(net, tx))
    with_correct = jax.jit(train.make_train_step(net, tx, with_correct=True))
    key = jax.random.key(1)
    new_plain, loss_plain = plain(state, images, labels, key)
    new, (loss, correct) = with_correct(state, images, labels, key)
    logits = net.apply({"params": state.params}, images, train=True)
    np.testing.assert_array_equal(np.asarray(correct), np.argmax(logits, -1) == labels)
    assert float(loss) == float(loss_plain)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Batches:
    """A plain BatchSource (no compiled-epoch shortcut) over an ArraySource's batches."""

    per_model = True

    def __init__(self, source):
        self.source = source

    def epoch_batches(self, epoch, key):
        return self.source.epoch_batches(epoch, key)


@pytest.mark.parametrize("pool_mode", ["vmap", "loop"])
def test_driver_trains_any_batch_source_like_the_compiled_epoch(pool_mode):
    # An ArraySource runs as one compiled epoch program; any other source feeds its batches to
    # the jitted step. ArraySource.epoch_batches yields the program's batches, so both agree.
    images, labels = _data(n=20)
    net = models.get_model("ConvNet", 3, (8, 8, 1), width=4)
    tx = train.sgd(0.05, momentum=0.9)
    # A random augmentation (crop and flip: vmapped DSA compiles for long on CPU): each form
    # must draw the same keys for the same batches.
    step = train.make_train_step(net, tx, augment.make_augment("crop_flip"))
    source = train.ArraySource(images, labels, 8)
    keys = train.pool_epoch_keys(jax.random.key(1), 2)
    trained = {}
    # float64: the two forms compile to different programs that may reorder sums (~1e-16
    # relative, ~1e-14 after two epochs); 1e-10 leaves a margin of ~1e4 on any CPU.
    with jax.enable_x64(True):
        for name, batches in (("compiled", source), ("batches", _Batches(source))):
            pool = train.init_pool(net, tx, jax.random.key(0), (8, 8, 1), 2)
            trained[name] = train.train_epochs(
                pool, step, batches, epochs=2, epoch_keys=keys, pool_mode=pool_mode
            )
    compiled, batches = jax.tree.leaves(trained["compiled"]), jax.tree.leaves(trained["batches"])
    assert compiled[0].dtype == np.float64
    for a, b in zip(compiled, batches, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_driver_resumes_bit_identical_with_on_epoch_record(tmp_path):
    images, labels = _data(n=20)
    net = models.get_model("ConvNet", 3, (8, 8, 1), width=4)
    tx = train.sgd(0.05, momentum=0.9)
    step = train.make_train_step(net, tx)
    source = train.ArraySource(images, labels, 8)
    keys = train.pool_epoch_keys(jax.random.key(1), 2)

    def run(directory, stop=None):
        record = {"loss": np.full((3, 2), np.nan, np.float32)}

        def on_epoch(epoch, state, outputs):
            record["loss"][epoch] = outputs.loss

        pool = train.init_pool(net, tx, jax.random.key(0), (8, 8, 1), 2)
        with checkpoint.Checkpoints(directory) as saves:
            result = train.train_epochs(
                pool, step, source, epochs=3, epoch_keys=keys,
                lr_schedule=lambda e: 0.05 / (e + 1), on_epoch=on_epoch, record=record,
                checkpoints=saves, stop_after_epochs=stop,
            )  # fmt: skip
        return result, record

    whole, whole_record = run(tmp_path / "whole")
    assert run(tmp_path / "killed", stop=2)[0] is None
    resumed, resumed_record = run(tmp_path / "killed")
    assert resumed[1].shape == (1, 2)  # only the epoch this call ran
    np.testing.assert_array_equal(resumed_record["loss"], whole_record["loss"])
    for a, b in zip(jax.tree.leaves(whole[0]), jax.tree.leaves(resumed[0]), strict=True):
        np.testing.assert_array_equal(a, b)
