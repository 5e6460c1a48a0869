"""DATM and TESLA's soft-label assignment on the MTT core (ddjax.distill.datm, .soft_labels).

Tiny nets, N <= 2 inner steps, 8x8 images; every program is compiled with XLA's fast options
(see tests/test_matching.py), which change float rounding, not what is computed.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import models, train
from ddjax.config import import_config
from ddjax.distill import core, datm, matching, soft_labels, tesla
from ddjax.errors import DDJaxError

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 3
IPC = 2
NUM_IMAGES = NUM_CLASSES * IPC
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
STRATEGY = "flip"  # one DSA group: per-sample draws at a fraction of the compile time
# DATM with sequential generation: UpperBound grows from 2 to T+ = 4 over 4 iterations. The
# step tests run one inner step, without DSA, in mode 'unroll' (each about halves compile
# time); more steps, DSA and the other modes are exercised by the loss-level tests.
STEP = core.StepConfig(
    syn_steps=1,
    expert_epochs=1,
    max_start_epoch=4,
    batch_syn=4,
    lr_img=10.0,
    lr_lr=1e-3,
    dsa=False,
)
DATM = datm.DATM(
    min_start_epoch=1,
    current_max_start_epoch=2,
    expansion_end_iteration=4,
    lr_y=2.0,
    threshold=1e6,
)


def _compile(fun, *example_args):
    return jax.jit(fun).lower(*example_args).compile(compiler_options=FAST_COMPILE)


def _run(fun, *args):
    return _compile(fun, *args)(*args)


@functools.cache
def _model(norm: str = "none"):
    return models.get_model("ConvNet", NUM_CLASSES, IMAGE_SHAPE, width=8, depth=1, norm=norm)


@functools.cache
def _inner():
    """The step tests' inner loop: mode 'unroll' (DSA is off in :data:`STEP`)."""
    return matching.InnerLoop(_model(), mode="unroll")


@functools.cache
def _trajectories(num_experts: int = 2, num_snapshots: int = 6):
    """``[E, T+1, ...]`` trajectories: each expert drifts from its own init by random steps."""
    rng = np.random.default_rng(0)
    experts = []
    for e in range(num_experts):
        params = models.init_variables(_model(), jax.random.key(e), IMAGE_SHAPE)["params"]
        snapshots = [params]
        for _ in range(num_snapshots - 1):
            params = jax.tree.map(
                lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params
            )
            snapshots.append(params)
        experts.append(jax.tree.map(lambda *s: jnp.stack(s), *snapshots))
    return jax.tree.map(lambda *e: jnp.stack(e), *experts)


def _label_logits(seed: int = 0, num_images: int = NUM_IMAGES):
    rng = np.random.default_rng(seed)
    classes = np.arange(num_images) % NUM_CLASSES
    return (rng.normal(size=(num_images, NUM_CLASSES)) + 2 * np.eye(NUM_CLASSES)[classes]).astype(
        np.float32
    )


def _state(method=DATM, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(NUM_IMAGES, *IMAGE_SHAPE)).astype(np.float32)
    classes = np.repeat(np.arange(NUM_CLASSES), IPC)
    if isinstance(method, datm.DATM):  # learned label logits
        labels = _label_logits(seed)
    elif isinstance(method, tesla.TeslaLabels):  # TESLA's assignment starts one-hot
        labels = np.eye(NUM_CLASSES, dtype=np.float32)[classes]
    else:  # hard labels
        labels = classes.astype(np.int32)
    return core.init_state(images, labels, 0.01, jax.random.PRNGKey(seed), STEP, method)


@functools.cache
def _step(method=DATM):
    return core.make_distill_step(
        _inner(), STEP, method, donate=False, compiler_options=FAST_COMPILE
    )


def _range(method, config=STEP):
    return dict(
        max_start_epoch=config.max_start_epoch,
        current_max_start_epoch=method.current_max_start_epoch,
        expansion_end_iteration=method.expansion_end_iteration,
    )


def _published_upper_bound(it, current, maximum, end):
    """DATM.py's expression, in Python floats as published."""
    return min(current + int((maximum - current) * it / end), maximum)


# --- the matching range and sequential generation ----------------------------------------------


def test_upper_bound_follows_datm_formula_and_draws_cover_the_range():
    iterations = [0, 1, 13, 14, 15, 50, 99, 100, 101, 5000]
    bounds = datm.start_epoch_upper_bound(
        jnp.asarray(iterations), max_start_epoch=12, current_max_start_epoch=5,
        expansion_end_iteration=100,
    )  # fmt: skip
    assert bounds.tolist() == [_published_upper_bound(it, 5, 12, 100) for it in iterations]
    assert bounds.tolist() == [5, 5, 5, 5, 6, 8, 11, 12, 12, 12]
    off = datm.start_epoch_upper_bound(jnp.asarray(iterations), max_start_epoch=12)
    assert off.tolist() == [12] * len(iterations)

    sample = functools.partial(
        datm.sample_start_epoch, min_start_epoch=2, max_start_epoch=12,
        current_max_start_epoch=5, expansion_end_iteration=100,
    )  # fmt: skip
    plain = functools.partial(datm.sample_start_epoch, min_start_epoch=0, max_start_epoch=12)

    @jax.jit
    def all_draws(keys, iterations):
        datm_draws = jax.vmap(jax.vmap(sample, in_axes=(0, None)), in_axes=(None, 0))
        mtt_draws = jax.vmap(lambda k: jax.random.randint(k, (), 0, 12))(keys)
        return datm_draws(keys, iterations), mtt_draws, jax.vmap(plain, (0, None))(keys, 7)

    iterations = (0, 60, 300)
    draws, mtt_draws, plain_draws = all_draws(
        jax.random.split(jax.random.key(0), 200), jnp.asarray(iterations)
    )
    for iteration, drawn in zip(iterations, np.asarray(draws), strict=True):
        bound = _published_upper_bound(iteration, 5, 12, 100)
        assert set(drawn.tolist()) == set(range(2, bound))
    # T- = 0 without sequential generation is MTT's draw, number for number.
    np.testing.assert_array_equal(plain_draws, mtt_draws)


def test_datm_step_traces_once_while_the_bound_grows():
    step = _step()
    state, trajectories = _state(), _trajectories()
    seen = []
    for iteration in range(6):
        state, metrics = step(state, trajectories, jnp.int32(iteration % 2))
        bound = _published_upper_bound(iteration, 2, 4, 4)
        assert int(metrics["upper_bound"]) == bound
        assert DATM.min_start_epoch <= int(metrics["start_epoch"]) < bound
        assert not bool(metrics["skipped"])
        seen.append(bound)
    assert seen == [2, 2, 3, 3, 4, 4]
    assert step._cache_size() == 1
    assert int(state.step) == 6


# --- learnable soft labels -----------------------------------------------------------------------


def test_soft_cross_entropy_is_datm_formula_and_the_evaluation_loss():
    rng = np.random.default_rng(0)
    logits, label_logits = rng.normal(size=(2, 5, 4))
    log_softmax = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    targets = np.exp(label_logits) / np.sum(np.exp(label_logits), axis=1, keepdims=True)
    expected = np.sum(-log_softmax * targets) / 5
    np.testing.assert_allclose(soft_labels.soft_cross_entropy(logits, label_logits), expected, 1e-6)
    # Training on the saved probabilities with ddjax's loss is DATM's evaluation loss.
    probabilities = soft_labels.label_probabilities(label_logits)
    np.testing.assert_allclose(train.cross_entropy(logits, probabilities), expected, rtol=1e-6)


def _problem(dtype=jnp.float32, norm="none", num_images=5):
    rng = np.random.default_rng(1)
    model = _model(norm)
    images = jnp.asarray(rng.normal(size=(num_images, *IMAGE_SHAPE)), dtype)
    logits = jnp.asarray(_label_logits(1, num_images), dtype)
    start = models.init_variables(model, jax.random.key(1), IMAGE_SHAPE)["params"]
    start = jax.tree.map(lambda p: jnp.asarray(p, dtype), start)
    target = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), dtype), start)
    return model, images, logits, start, target


def test_label_gradient_matches_central_finite_differences_in_float64():
    with jax.enable_x64(True):
        model, images, logits, start, target = _problem(jnp.float64)
        # Two steps (the second through the first's Hessian), a short masked chunk, no DSA.
        indices, mask = matching.inner_batch_indices(jax.random.key(7), 5, 2, 2)
        config = dict(
            inner=matching.InnerLoop(model, mode="unroll"),
            label_transform=soft_labels.label_probabilities,
        )
        inner_lr = jnp.float64(0.2)

        def loss_and_grads(images, logits, inner_lr):
            return matching.match_loss_and_grads(
                images, logits, inner_lr, start, target, indices, mask, **config
            )

        # One program: its loss output at perturbed logits gives the finite differences.
        compiled = _compile(loss_and_grads, images, logits, inner_lr)
        _, grads = compiled(images, logits, inner_lr)

        def loss(images, logits, inner_lr):
            return compiled(images, logits, inner_lr)[0]

        assert grads.labels.dtype == jnp.float64 and grads.labels.shape == logits.shape
        rng = np.random.default_rng(2)
        eps = 1e-5
        for _ in range(2):
            direction = jnp.asarray(rng.normal(size=logits.shape))
            fd = (
                loss(images, logits + eps * direction, inner_lr)
                - loss(images, logits - eps * direction, inner_lr)
            ) / (2 * eps)
            np.testing.assert_allclose(float(jnp.vdot(grads.labels, direction)), fd, rtol=1e-6)
        assert float(jnp.max(jnp.abs(grads.labels))) > 0.0
    assert jnp.ones(()).dtype == jnp.float32  # x64 is off again


@functools.cache
def _learned_label_grads(mode: str, num_steps: int):
    model, images, logits, start, target = _problem()
    indices, mask = matching.inner_batch_indices(jax.random.key(7), 5, 2, num_steps)

    def loss_and_grads(images, logits, inner_lr, key):
        return matching.match_loss_and_grads(
            images, logits, inner_lr, start, target, indices, mask,
            inner=matching.InnerLoop(model, mode=mode, dsa_strategy=STRATEGY),
            augment_key=key, label_transform=soft_labels.label_probabilities,
        )  # fmt: skip

    return _run(loss_and_grads, images, logits, jnp.float32(0.2), jax.random.key(3))


def _assert_grads_close(actual, expected, rtol):
    for name in ("images", "labels", "inner_lr"):
        np.testing.assert_allclose(
            getattr(actual, name), getattr(expected, name), rtol=rtol, atol=1e-7, err_msg=name
        )


def test_label_gradients_in_remat_and_tesla_modes():
    # One step with DSA: remat's checkpointed step is the exact gradient; TESLA's estimator
    # (with DATM_tesla.py's label term) is exact for N = 1 (test_matching: not for N > 1).
    unroll = _learned_label_grads("unroll", 1)
    _assert_grads_close(_learned_label_grads("remat", 1)[1], unroll[1], 1e-5)
    _assert_grads_close(_learned_label_grads("tesla", 1)[1], unroll[1], 1e-5)
    assert float(jnp.max(jnp.abs(unroll[1].labels))) > 0.0


def test_datm_step_is_sgd_momentum_on_images_lr_and_labels():
    """Two steps equal the loss gradients + PyTorch SGD (momentum 0.5, 0.5 and 0.9 for y)."""
    state, trajectories = _state(), _trajectories()
    new, _ = _step()(state, trajectories, jnp.int32(1))
    newer, _ = _step()(new, trajectories, jnp.int32(0))

    images, lr, logits = np.asarray(state.images), np.float32(state.inner_lr), state.labels
    buffers = [None, None, None]
    current = state
    for iteration, expert in enumerate((1, 0)):
        key, start_key, batch_key, augment_key = jax.random.split(current.key, 4)
        t = int(datm.sample_start_epoch(start_key, iteration, min_start_epoch=1, **_range(DATM)))
        start = jax.tree.map(lambda a, e=expert, t=t: a[e, t], trajectories)
        target = jax.tree.map(lambda a, e=expert, t=t: a[e, t + 1], trajectories)
        indices, mask = matching.inner_batch_indices(batch_key, NUM_IMAGES, 4, 1)
        del augment_key  # DSA is off in this configuration
        _, grads = matching.match_loss_and_grads(
            jnp.asarray(images), jnp.asarray(logits), lr, start, target, indices, mask,
            inner=matching.InnerLoop(_model(), mode="unroll"),
            label_transform=soft_labels.label_probabilities,
        )  # fmt: skip
        gradients = (np.asarray(grads.images), np.float32(grads.inner_lr), np.asarray(grads.labels))
        for i, (g, momentum) in enumerate(zip(gradients, (0.5, 0.5, 0.9), strict=True)):
            buffers[i] = g if buffers[i] is None else momentum * buffers[i] + g
        images = images - STEP.lr_img * buffers[0]
        lr = lr - STEP.lr_lr * buffers[1]
        logits = np.asarray(logits) - DATM.lr_y * buffers[2]
        current = current._replace(key=key)
        current = current._replace(images=jnp.asarray(images), inner_lr=jnp.float32(lr))
        current = current._replace(labels=jnp.asarray(logits))
    np.testing.assert_allclose(newer.images, images, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(newer.inner_lr, lr, rtol=1e-4)
    np.testing.assert_allclose(newer.labels, logits, rtol=1e-3, atol=1e-5)
    assert not np.allclose(newer.labels, state.labels)  # the labels did learn


# --- the threshold and the guards ----------------------------------------------------------------


def _learned(state):
    """Everything an update changes: all but the step counter and the key."""
    return state._replace(step=None, key=None)


def test_threshold_and_non_finite_losses_skip_the_whole_update():
    method = dataclasses.replace(DATM, threshold=1e-6)
    state = _state(method)
    for trajectories, reason in (
        (_trajectories(), "over_threshold"),
        (jax.tree.map(lambda a: a.at[0].set(jnp.nan), _trajectories()), "non_finite"),
    ):
        new, metrics = _step(method)(state, trajectories, jnp.int32(0))
        assert bool(metrics["skipped"]) and bool(metrics[reason]), reason
        other = {"over_threshold": "non_finite", "non_finite": "over_threshold"}[reason]
        assert not bool(metrics[other])
        jax.tree.map(np.testing.assert_array_equal, _learned(new), _learned(state))
        assert int(new.step) == 1 and not np.array_equal(new.key, state.key)
    # The same iteration under the default threshold is applied.
    applied, metrics = _step()(_state(), _trajectories(), jnp.int32(0))
    assert not bool(metrics["skipped"]) and float(metrics["loss"]) > 1e-6
    assert not np.array_equal(applied.labels, state.labels)


# --- TESLA's soft-label assignment ---------------------------------------------------------------


def test_tesla_labels_are_softmax_of_the_target_expert_in_eval_mode():
    # MTT's step (STEP, mode 'unroll', no DSA) with TESLA's label assignment.
    method = tesla.TeslaLabels()
    state, trajectories = _state(method), _trajectories()
    new, metrics = _step(method)(state, trajectories, jnp.int32(1))
    _, start_key, batch_key, _ = jax.random.split(state.key, 4)
    t = int(jax.random.randint(start_key, (), 0, STEP.max_start_epoch))
    assert int(metrics["start_epoch"]) == t
    start = jax.tree.map(lambda a: a[1, t], trajectories)
    target = jax.tree.map(lambda a: a[1, t + 1], trajectories)
    logits = _model().apply({"params": target}, state.images, train=False)
    expected = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_allclose(new.labels, expected, rtol=1e-5, atol=1e-7)
    # The inner loop trained on exactly these labels (the loss is computed before the update).
    indices, mask = matching.inner_batch_indices(batch_key, NUM_IMAGES, 4, 1)
    loss = matching.match_loss(
        state.images, expected, state.inner_lr, start, target, indices, mask,
        inner=matching.InnerLoop(_model()),
    )  # fmt: skip
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-4)
    assert new.label_opt_state == ()  # assigned, not learned
    assert not np.array_equal(new.images, state.images)


# --- initialisation from the experts -------------------------------------------------------------


def test_samples_predicted_correctly_scans_experts_in_order():
    labels = np.repeat([0, 1], 6)  # images 0-5 are class 0, 6-11 class 1
    predicted = np.array(
        [
            [0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1],  # expert 0: right on 0,1,3,5 and 11
            [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1],  # expert 1: right on 6, 7, 10, 11
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
        ]
    )
    calls = []

    def predict(expert, indices):
        calls.append(expert)
        return np.eye(2)[predicted[expert, indices]]

    chosen = datm.select_correctly_predicted(labels, 2, 3, predict, num_experts=3, seed=4)
    # Class 0: the first three of expert 0's correct images in the class's shuffled order.
    order = np.random.default_rng(4).permutation(np.arange(6))
    expected0 = [i for i in order if predicted[0, i] == 0][:3]
    assert chosen[:3].tolist() == expected0
    # Class 1: expert 0 knows only image 11, so expert 1 is scanned next; expert 2 never is.
    assert chosen[3] == 11 and set(chosen[3:].tolist()) - {11} <= {6, 7, 10}
    assert len(set(chosen[3:].tolist())) == 3 and 2 not in calls

    # Only image 0 of class 0 is ever classified as class 0: a one-line error, not a hang.
    def only_image_0(expert, indices):
        return np.eye(2)[(indices != 0).astype(int)]

    with pytest.raises(DDJaxError, match="only 1 of the 6 train images of class 0"):
        datm.select_correctly_predicted(labels, 2, 3, only_image_0, num_experts=2)


def test_label_init_averages_exactly_the_experts_that_are_right():
    logits = np.array(
        [  # 3 experts x 3 images x 3 classes; images are of classes 0, 1, 2
            [[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 0.0, 1.0]],
            [[1.0, 4.0, 0.0], [0.0, 6.0, 2.0], [1.0, 0.0, 0.0]],
            [[2.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 7.0]],
        ]
    )
    classes = np.array([0, 1, 2])
    expected = np.stack(
        [
            (logits[0, 0] + logits[2, 0]) / 2,  # experts 0 and 2 say class 0
            (logits[0, 1] + logits[1, 1]) / 2,  # experts 0 and 1 say class 1
            logits[2, 2],  # only expert 2 says class 2
        ]
    )
    np.testing.assert_allclose(datm.average_correct_logits(logits, classes), expected, rtol=1e-6)
    with pytest.raises(DDJaxError, match="classified correctly by none of the 3 experts"):
        datm.average_correct_logits(logits, np.array([0, 1, 1]))


# --- options and validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(min_start_epoch=4), "min_start_epoch"),
        (dict(current_max_start_epoch=1), "current_max_start_epoch"),
        (dict(current_max_start_epoch=None), "expansion_end_iteration"),
        (dict(expansion_end_iteration=0), "expansion_end_iteration"),
        (dict(soft_labels="logits"), "soft_labels"),
        (dict(lr_y=None), "lr_y"),
        # Formerly refused by StepConfig for lr_y ("lr_y=2.0 is the learned labels' learning
        # rate"); DATM.check_config refuses the label kind first.
        (dict(soft_labels="tesla"), "soft_labels='tesla' with method='datm'"),
        (dict(momentum_y=1.0), "momentum_y"),
        (dict(threshold=0.0), "threshold"),
    ],
)
def test_bad_datm_options_name_the_field(changes, message):
    # A config with the settings of STEP and DATM above (datm_fields), then one change.
    config = import_config("distill/datm.py").datm_fields(
        DATA, ipc=IPC, syn_steps=1, expert_epochs=1, max_start_epoch=4, batch_syn=4,
        lr_img=10.0, lr_lr=1e-3, lr_teacher=0.01, min_start_epoch=1, current_max_start_epoch=2,
        expansion_end_iteration=4, lr_y=2.0, threshold=1e6, zca=False,
    )  # fmt: skip
    for key, value in changes.items():
        config[key] = value
    with pytest.raises(DDJaxError, match=message):
        datm.DATM.check_config(config)


def test_labels_must_fit_the_label_mode():
    with pytest.raises(DDJaxError, match="method 'datm' needs labels of shape"):
        core.init_state(np.zeros((6, *IMAGE_SHAPE)), np.zeros(6, np.int32), 0.01,
                        jax.random.PRNGKey(0), STEP, DATM)  # fmt: skip


# --- batch sharding ----------------------------------------------------------------------------

_DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import test_datm as t
    from ddjax import sharding
    from ddjax.distill import core, matching
    assert jax.device_count() == 4
    mesh = sharding.make_mesh(pool=1, data=4)
    state = sharding.replicate(t._state(), mesh)
    trajectories = sharding.replicate(t._trajectories(), mesh)
    inner = matching.InnerLoop(t._model(), mode="unroll",
                               batch_sharding=NamedSharding(mesh, P("data")))
    step = core.make_distill_step(inner, t.STEP, t.DATM, compiler_options=t.FAST_COMPILE)
    for e in range(2):
        state, metrics = step(state, trajectories, jnp.int32(e))
    np.savez({out!r}, images=state.images, labels=state.labels, inner_lr=state.inner_lr)
    """
)


def test_sharded_minibatch_gives_the_same_labels_and_images(tmp_path):
    """The inner minibatch (4 images) split over 4 forced host devices == one device.

    Both in float64 (state, trajectories and student follow jax_enable_x64): the split only
    reorders sums (~1e-16 relative; two steps with lr_img=10 and lr_y=2 grow it a hundredfold
    at most, as they grew float32's ~1e-7 to ~1e-5, the old tolerance, which depended on the
    CPU's instruction set), so 1e-10 is a margin of ~1e4 that still catches a real difference.
    """
    out = str(tmp_path / "sharded.npz")
    script = _DEVICE_SCRIPT.format(tests=os.path.dirname(__file__), out=out)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with jax.enable_x64(True):
        state = _state()
        trajectories = _trajectories.__wrapped__()  # float64, not the cached float32 ones
        for e in range(2):
            state, _ = _step()(state, trajectories, jnp.int32(e))
        initial = _state()
    assert state.images.dtype == state.labels.dtype == jnp.float64
    with np.load(out) as sharded:
        for name in ("images", "labels", "inner_lr"):
            np.testing.assert_allclose(sharded[name], getattr(state, name), rtol=0, atol=1e-10)
    assert not np.allclose(state.labels, initial.labels)
    assert not np.allclose(state.images, initial.images)


# --- the run: experts -> DATM with checkpoints and resume ----------------------------------------

DATA = "synthetic:classes=3,size=8,channels=1,train=24,test=12,seed=1"
RUN_MODEL = "ConvNetD1"  # one conv block: the fewest ops to compile


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    from ddjax import data, experts

    out = tmp_path_factory.mktemp("experts")
    # Strong enough (lr 0.1, batch 24) that the experts classify most images correctly; no
    # augmentation, which halves the compile time.
    experts.train_experts(
        data.load_dataset(DATA), out_dir=out, model=RUN_MODEL, num_experts=2, epochs=4, lr=0.1,
        batch_size=24, augment="none", experts_at_once=2, test_every=4, progress=False,
    )  # fmt: skip
    return out


def _datm_run_config(experts_path, **overrides):
    config = import_config("distill/datm.py").datm_fields(
        DATA, ipc=2, syn_steps=2, expert_epochs=1, min_start_epoch=1, max_start_epoch=3,
        current_max_start_epoch=2, expansion_end_iteration=2, lr_img=10.0, lr_lr=1e-3,
        lr_teacher=0.01, lr_y=2.0, threshold=5.0, zca=False, model=RUN_MODEL, iterations=3,
        eval_every=3, eval_epochs=1,
    )  # fmt: skip
    config.mode = "unroll"
    config.dsa = False
    config.eval.protocol = "dc"  # no augmentation: compiles in a fraction of DSA's time
    config.experts_dir = str(experts_path)
    config.experts_in_memory = 2
    config.checkpoint_every = 2
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def test_datm_run_saves_probabilities_and_logits_and_resumes(experts_dir, tmp_path):
    from ddjax.distill.run import run_distill
    from ddjax.synset import load_synset

    config = _datm_run_config(experts_dir)
    assert config.eval.batch_size == 128  # DATM's evaluation batch
    work = tmp_path / "run"
    results = run_distill(config, str(work), compiler_options=FAST_COMPILE)
    synset = load_synset(work / "synset.npz")
    assert synset.labels.shape == (6, NUM_CLASSES) and synset.labels.dtype == np.float32
    np.testing.assert_allclose(synset.labels.sum(1), 1.0, rtol=1e-6)
    logits = np.load(work / "synset_label_logits.npy")
    np.testing.assert_allclose(synset.labels, jax.nn.softmax(logits, -1), rtol=1e-6)
    assert (work / "synset_best_label_logits.npy").exists()
    assert synset.meta["method"] == "datm" and "softmax" in synset.meta["labels"]
    assert results["evals"].keys() == {"0", "3"}
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert steps[-1]["upper_bound"] == 3 and "label_grad_norm" in steps[-1]
    # Initialised from images the experts classify correctly: the averaged logits of the
    # experts that are right have the image's class as arg-max (DATM's InitialAcc of 1).
    (init,) = [r for r in records if r["event"] == "init"]
    assert init["init"] == "samples_predicted_correctly" and init["label_accuracy"] == 1.0
    # Re-running restores the DATM state (logits and their momentum) from the last checkpoint.
    (work / "synset_label_logits.npy").unlink()
    run_distill(config, str(work), compiler_options=FAST_COMPILE)
    np.testing.assert_array_equal(np.load(work / "synset_label_logits.npy"), logits)
    np.testing.assert_array_equal(load_synset(work / "synset.npz").images, synset.images)


def test_datm_state_round_trips_through_a_checkpoint(tmp_path):
    from ddjax import checkpoint

    state, _ = _step()(_state(), _trajectories(), jnp.int32(0))
    with checkpoint.Checkpoints(tmp_path) as checkpoints:
        checkpoints.save(1, state)
        template = core.init_state(
            np.zeros_like(state.images), np.zeros_like(state.labels), 0.0, jax.random.PRNGKey(1),
            STEP, DATM,
        )  # fmt: skip
        restored = checkpoints.restore(1, template)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "selmatch"}, "start from configs/distill/selmatch.py"),
        ({"method": "tesla"}, "soft_labels='tesla' for its labels"),
        ({"soft_labels": "none"}, "soft_labels='none' with method='datm'"),
        ({"init": "noise"}, "init='noise' with method='datm'"),
        ({"method": "mtt"}, "soft_labels='learned' with method='mtt'"),
        ({"method": "mtt", "soft_labels": "tesla", "init": "real"}, "lr_y=2.0 is the learned"),
        ({"max_start_epoch": 4}, "needs at least 5 epochs"),
    ],
)
def test_bad_runs_are_refused_before_any_work(experts_dir, tmp_path, overrides, message):
    from ddjax.distill.run import run_distill

    config = _datm_run_config(experts_dir, **overrides)
    with pytest.raises(DDJaxError, match=message):
        run_distill(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
