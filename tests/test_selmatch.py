"""SelMatch on the MTT core: window init, partial update, combined augmentation, its protocol.

Tiny nets (ConvNet width 8, one block), 8x8 synthetic images, N = 2 inner steps; the programs
are compiled with XLA's fast options (see tests/test_matching.py), which change float rounding,
not what is computed.
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

from ddjax import augment, data, difficulty, evaluate, models, train
from ddjax.config import import_config
from ddjax.distill import core, matching, selmatch
from ddjax.errors import DDJaxError
from ddjax.synset import SyntheticSet

DATA = "synthetic:classes=3,size=8,channels=1,train=24,test=12,seed=1"
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 3
IPC, ALPHA, BETA = 4, 0.5, 0.5  # cpc = 2 distilled, spc = 2 selected, ths = 2 per class
NUM_DISTILLED, NUM_FROZEN = NUM_CLASSES * 2, NUM_CLASSES * 2
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
STEP = core.StepConfig(
    syn_steps=1,
    expert_epochs=1,
    max_start_epoch=2,
    batch_syn=4,
    lr_img=10.0,
    lr_lr=1e-3,
    dsa=False,  # DSA's key use is MTT's (tests/test_distill.py); here it only costs compile time
)
METHOD = selmatch.SelMatch(num_frozen=NUM_FROZEN)


@functools.cache
def _dataset():
    return data.load_dataset(DATA)


@functools.cache
def _scores():
    """Forgetting-like integer scores with ties (higher = harder)."""
    values = np.random.default_rng(0).integers(0, 5, size=len(_dataset().y_train))
    return difficulty.DifficultyScores(values.astype(np.float64), "harder", "test")


@functools.cache
def _model():
    # SelMatch's student is a BatchNorm ConvNet: BN in train mode inside the inner loop.
    return models.get_model("ConvNet", NUM_CLASSES, IMAGE_SHAPE, width=8, depth=1, norm="batch")


@functools.cache
def _trajectories(num_experts: int = 2, num_snapshots: int = 4):
    """``[E, T+1, ...]`` trajectories: each expert drifts from a random start by random steps
    (NumPy on the parameter shapes, so that building them compiles nothing), in the model's
    dtype (float64 under jax_enable_x64; cached per mode by the callers that switch)."""
    rng = np.random.default_rng(0)
    shapes = models.variable_shapes(_model(), IMAGE_SHAPE)["params"]
    init = jax.tree.map(lambda x: 0.3 * rng.normal(size=x.shape).astype(x.dtype), shapes)
    experts = []
    for _ in range(num_experts):
        params, snapshots = init, [init]
        for _ in range(num_snapshots - 1):
            params = jax.tree.map(
                lambda p: p + 0.05 * rng.normal(size=p.shape).astype(p.dtype), params
            )
            snapshots.append(params)
        experts.append(jax.tree.map(lambda *s: np.stack(s), *snapshots))
    return jax.tree.map(lambda *e: jnp.asarray(np.stack(e)), *experts)


def _initial():
    return selmatch.initial_set(_dataset(), IPC, ALPHA, BETA, scores=_scores())


def _state(config=STEP, method=METHOD):
    init = _initial()
    return core.init_state(init.images, init.labels, 0.01, jax.random.PRNGKey(0), config, method)


@functools.cache
def _inner(mode="unroll"):
    return matching.InnerLoop(_model(), mode=mode)


@functools.cache
def _step(config=STEP, mode="unroll"):
    return core.make_distill_step(
        _inner(mode), config, METHOD, donate=False, compiler_options=FAST_COMPILE
    )


def _match_grads(images, labels, lr, start, target, indices, mask):
    """``match_loss_and_grads`` compiled with the fast options (the reference computation)."""

    def grads(*args):
        return matching.match_loss_and_grads(*args, inner=_inner("unroll"))[1]

    args = (images, labels, lr, start, target, indices, mask)
    return jax.jit(grads).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


# --- initialisation -----------------------------------------------------------------------------


def test_window_init_is_cat_of_distilled_and_selected_from_the_ranking():
    dataset = _dataset()
    init = _initial()
    ranking = difficulty.rank_per_class(_scores(), dataset.y_train, NUM_CLASSES)
    assert (init.num_distilled, init.num_frozen) == (NUM_DISTILLED, NUM_FROZEN)
    for c in range(NUM_CLASSES):
        # ths = 2, spc = 2: D_select = s[2:4], D_distill = s[4:6]
        np.testing.assert_array_equal(init.selected_indices[c], ranking[c][2:4])
        np.testing.assert_array_equal(init.distilled_indices[c], ranking[c][4:6])
    order = np.concatenate([init.distilled_indices.ravel(), init.selected_indices.ravel()])
    np.testing.assert_array_equal(init.images, dataset.x_train[order])
    np.testing.assert_array_equal(init.labels, [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(dataset.y_train[order], init.labels)

    # SelMatch's 'random': per class the first IPC of a permutation, the first spc selected.
    rand = selmatch.initial_set(dataset, IPC, ALPHA, BETA, init="random", seed=3)
    rng = np.random.default_rng(3)
    for c in range(NUM_CLASSES):
        chosen = rng.permutation(np.flatnonzero(dataset.y_train == c))[:IPC]
        np.testing.assert_array_equal(rand.selected_indices[c], chosen[:2])
        np.testing.assert_array_equal(rand.distilled_indices[c], chosen[2:])
    with pytest.raises(DDJaxError, match="distils floor\\(ipc \\* alpha\\) = 0"):
        selmatch.initial_set(dataset, IPC, 0.2, BETA, scores=_scores())
    with pytest.raises(DDJaxError, match="init='window' needs per-example difficulty scores"):
        selmatch.initial_set(dataset, IPC, ALPHA, BETA)


# --- the partial update -------------------------------------------------------------------------


def test_partial_update_is_mtt_on_the_distilled_part_only():
    """Two steps = match_loss_and_grads over the union + SGD momentum on the distilled rows.

    The selected images stay bit-identical, and the image optimiser's momentum buffer covers
    only the distilled images (SelMatch's ``SGD([image_syn_c], momentum=0.5)``).
    """
    state = _state()
    trajectories = _trajectories()
    new, _ = _step()(state, trajectories, jnp.int32(1))
    newer, metrics = _step()(new, trajectories, jnp.int32(0))

    images, lr = np.asarray(state.images), np.float32(state.inner_lr)
    buf_x, buf_lr, current = None, None, state
    for expert in (1, 0):
        key, start_key, batch_key, augment_key = jax.random.split(current.key, 4)
        t = int(jax.random.randint(start_key, (), 0, STEP.max_start_epoch))
        start = jax.tree.map(lambda a, e=expert, t=t: a[e, t], trajectories)
        target = jax.tree.map(lambda a, e=expert, t=t: a[e, t + 1], trajectories)
        indices, mask = matching.inner_batch_indices(batch_key, len(images), 4, 1)
        del augment_key  # no DSA in STEP
        grads = _match_grads(
            jnp.asarray(images), current.labels, jnp.float32(lr), start, target, indices, mask
        )
        gx = np.asarray(grads.images)
        assert np.abs(gx[NUM_DISTILLED:]).max() > 0  # the selected images are in the loss
        gx = gx[:NUM_DISTILLED]
        glr = np.float32(grads.inner_lr)
        buf_x = gx if buf_x is None else 0.5 * buf_x + gx
        buf_lr = glr if buf_lr is None else 0.5 * buf_lr + glr
        images = images.copy()
        images[:NUM_DISTILLED] -= STEP.lr_img * buf_x
        lr = lr - STEP.lr_lr * buf_lr
        current = current._replace(images=jnp.asarray(images), inner_lr=jnp.float32(lr), key=key)
    assert not bool(metrics["skipped"])
    np.testing.assert_allclose(newer.images, images, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(newer.inner_lr, lr, rtol=1e-4)
    np.testing.assert_array_equal(newer.images[NUM_DISTILLED:], state.images[NUM_DISTILLED:])
    (momentum,) = [leaf for leaf in jax.tree.leaves(newer.image_opt_state) if leaf.ndim == 4]
    assert momentum.shape == (NUM_DISTILLED, *IMAGE_SHAPE)
    np.testing.assert_allclose(momentum, buf_x, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mode", ["remat", "unroll", "tesla"])
def test_selected_images_stay_bit_identical_in_every_gradient_mode(mode):
    config = dataclasses.replace(STEP, syn_steps=1)
    state = initial = _state(config)
    for i in range(3):
        state, metrics = _step(config, mode)(state, _trajectories(), jnp.int32(i % 2))
        assert not bool(metrics["skipped"])
    selected_rows = np.asarray(_dataset().x_train[_initial().selected_indices.ravel()])
    assert np.array_equal(np.asarray(state.images[NUM_DISTILLED:]), selected_rows)
    assert not np.allclose(state.images[:NUM_DISTILLED], initial.images[:NUM_DISTILLED])
    for leaf in jax.tree.leaves(state.image_opt_state):
        assert leaf.shape[0] == NUM_DISTILLED


def test_num_frozen_is_validated():
    assert len(_initial().images) == 12
    with pytest.raises(DDJaxError, match="method 'selmatch' leaves nothing to learn among 12"):
        _state(method=selmatch.SelMatch(num_frozen=12))
    with pytest.raises(DDJaxError, match="num_frozen=-1"):
        selmatch.SelMatch(num_frozen=-1)


_DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import test_selmatch as t
    from ddjax import sharding
    from ddjax.distill import core, matching
    assert jax.device_count() == 4
    mesh = sharding.make_mesh(pool=1, data=4)
    config = t.STEP
    state = sharding.replicate(t._state(config), mesh)
    trajectories = sharding.replicate(t._trajectories(), mesh)
    inner = matching.InnerLoop(t._model(), mode="unroll",
                               batch_sharding=NamedSharding(mesh, P("data")))
    step = core.make_distill_step(inner, config, t.METHOD, compiler_options=t.FAST_COMPILE)
    for e in range(2):
        state, metrics = step(state, trajectories, jnp.int32(e))
    np.savez({out!r}, images=state.images, inner_lr=state.inner_lr)
    """
)


def test_sharded_minibatch_gives_the_same_partial_update(tmp_path):
    """The inner minibatch (4 images) split over 4 forced host devices == one device.

    Both in float64 (state, trajectories and student follow jax_enable_x64): the split only
    reorders the BatchNorm and loss sums (~1e-16 relative; two steps with lr_img=10 grow it a
    hundredfold at most, as they grew float32's ~1e-7 to ~1e-5, the old tolerance, which
    depended on the CPU's instruction set), so 1e-10 is a margin of ~1e4 that still catches a
    real difference (per-device BatchNorm statistics: > 1e-3).
    """
    out = str(tmp_path / "sharded.npz")
    script = _DEVICE_SCRIPT.format(tests=os.path.dirname(__file__), out=out)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = STEP
    with jax.enable_x64(True):
        state = _state(config)
        trajectories = _trajectories.__wrapped__()  # float64, not the cached float32 ones
        for e in range(2):
            state, _ = _step(config)(state, trajectories, jnp.int32(e))
        initial = _state(config).images
    assert state.images.dtype == jnp.float64
    with np.load(out) as sharded:
        assert not np.allclose(sharded["images"], initial)
        np.testing.assert_allclose(sharded["images"], state.images, rtol=0, atol=1e-10)
        np.testing.assert_allclose(sharded["inner_lr"], state.inner_lr, rtol=1e-12)
        np.testing.assert_array_equal(sharded["images"][NUM_DISTILLED:], initial[NUM_DISTILLED:])


# --- evaluation: the combined augmentation and SelMatch's protocol ------------------------------


def test_combined_step_applies_dsa_to_distilled_images_only():
    """The 'combined' protocol's train step == the plain step on images augmented by hand:
    per-image DSA (its own group) for the distilled ones, crop+flip for the selected ones."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(6, *IMAGE_SHAPE)).astype(np.float32))
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    net = models.get_model("ConvNet", NUM_CLASSES, IMAGE_SHAPE, width=4, depth=1)
    tx = train.sgd(0.1, momentum=0.9, weight_decay=5e-4)
    # Random parameters of the right shapes (a real init would compile the PRNG per tensor).
    shapes = models.variable_shapes(net, IMAGE_SHAPE)["params"]
    params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), shapes)
    state = train.TrainState(params, {}, tx.init(params))
    strategy = "crop_flip"  # two groups (cheap to compile): per-image group choices matter
    # Shuffled order: the distilled flag travels with each image, not with its position.
    tagged = evaluate.tag_distilled(labels, 3, NUM_CLASSES)[jnp.array([4, 0, 5, 1, 3, 2])]
    batch = images[jnp.array([4, 0, 5, 1, 3, 2])]
    is_distilled = np.array([False, True, False, True, False, True])
    key = jax.random.key(7)
    combined_step = evaluate.make_combined_train_step(net, tx, NUM_CLASSES, strategy)
    new, loss = jax.jit(combined_step)(state, batch, jnp.asarray(tagged), key)

    key_distilled, key_rest = jax.random.split(key)
    dsa_keys = jax.random.split(key_distilled, 6)
    simple = augment.crop_flip(key_rest, batch)
    expected = np.asarray(simple).copy()
    for i in np.flatnonzero(is_distilled):
        expected[i] = augment.dsa(dsa_keys[i], batch[i : i + 1], strategy)[0]
    by_hand = train.make_train_step(net, tx, None)
    reference, reference_loss = jax.jit(by_hand)(
        state, jnp.asarray(expected), jnp.asarray(labels[[4, 0, 5, 1, 3, 2]]), key
    )
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, reference
    )
    # DSA and crop+flip give different images here, so the equality above pins down which
    # images got which augmentation.
    assert not np.allclose(expected[is_distilled], np.asarray(simple)[is_distilled])
    # Soft labels carry the flag as an extra column.
    soft = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    tagged_soft = evaluate.tag_distilled(soft, 2, NUM_CLASSES)
    assert tagged_soft.shape == (6, NUM_CLASSES + 1)
    np.testing.assert_array_equal(tagged_soft[:, -1], [1, 1, 0, 0, 0, 0])


def test_selmatch_protocol_is_the_published_one():
    import torch  # the reference scheduler

    p = evaluate.get_protocol("selmatch")
    assert (p.lr, p.momentum, p.weight_decay, p.batch_size) == (0.1, 0.9, 5e-4, 128)
    assert (p.augment, p.schedule, p.reset_epochs, p.total_epochs) == (
        "combined",
        "cosine",
        (),
        501,
    )
    assert evaluate.get_protocol("selmatch_dsa").augment == "dsa"
    # SelMatch utils.evaluate_synset: SGD(lr), CosineAnnealingLR(T_max=Epoch,
    # eta_min=lr * 0.01); for ep in range(Epoch + 1): train one epoch; scheduler.step().
    epochs = 7
    protocol = evaluate.get_protocol("selmatch", epochs=epochs)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0.1 * 0.01)
    published = []
    for _ in range(protocol.total_epochs):
        published.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [protocol.lr_schedule(0.1)(e) for e in range(protocol.total_epochs)]
    np.testing.assert_allclose(ours, published, rtol=1e-12)
    assert ours[-1] == pytest.approx(0.001)
    # The existing protocols are unchanged (step decay, momentum reset).
    mtt_protocol = evaluate.get_protocol("mtt")
    assert (mtt_protocol.schedule, mtt_protocol.reset_epochs) == ("step", (502,))
    # Epochs scale with IPC: scripts/eval (CIFAR-10: 5000 per class, CIFAR-100 and Tiny: 500).
    table = {(250, 5000): 1000, (500, 5000): 500, (1000, 5000): 250, (1500, 5000): 167,
             (25, 500): 1000, (50, 500): 500, (100, 500): 250, (150, 500): 167}  # fmt: skip
    assert {k: evaluate.selmatch_epochs(*k) for k in table} == table
    assert evaluate.selmatch_epochs(10, 6000) == 1000  # ddjax's cap below SelMatch's 5 %
    with pytest.raises(DDJaxError, match="schedule='linear'"):
        evaluate.get_protocol("selmatch", schedule="linear")
    with pytest.raises(DDJaxError, match="augment='mixup'"):
        evaluate.get_protocol("mtt", augment="mixup")


def test_combined_evaluation_needs_the_distilled_count():
    init = _initial()
    bare = SyntheticSet(init.images, init.labels, NUM_CLASSES)
    with pytest.raises(DDJaxError, match="needs the set's meta\\['num_distilled'\\]"):
        evaluate.evaluate_synset(bare, _dataset(), protocol="selmatch", epochs=1)
    too_many = SyntheticSet(init.images, init.labels, NUM_CLASSES, meta={"num_distilled": 13})
    with pytest.raises(DDJaxError, match="an integer in \\[0, 12\\]"):
        evaluate.evaluate_synset(too_many, _dataset(), protocol="selmatch", epochs=1)


# --- the run: experts -> SelMatch, resume, refusals, configs ------------------------------------

RUN_MODEL = "ConvNetD1"  # one conv block: the fewest ops to compile


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    from ddjax import experts

    out = tmp_path_factory.mktemp("experts")
    experts.train_experts(
        _dataset(), out_dir=out, model=RUN_MODEL, num_experts=2, epochs=3, lr=0.1,
        batch_size=24, augment="none", experts_at_once=2, test_every=3, progress=False,
    )  # fmt: skip
    return out


def _run_config(experts_path, **overrides):
    config = import_config("distill/selmatch.py").selmatch_fields(
        DATA, ipc=IPC, alpha=ALPHA, beta=BETA, eval_epochs=1, scores="forgetting",
        scores_higher="harder",  # selmatch_config's default; selmatch_fields' is 'easier'
        syn_steps=2, expert_epochs=1, max_start_epoch=2, lr_img=10.0, lr_lr=1e-3,
        lr_teacher=0.01, batch_syn=5, model=RUN_MODEL, eval_model=RUN_MODEL, iterations=4,
        eval_iterations=(0,), num_eval=1,
    )  # fmt: skip
    config.mode = "unroll"
    config.dsa = False  # no DSA in the inner loop; the evaluation's combined augmentation
    config.dsa_strategy = "crop_flip"  # uses this strategy (two groups: quick to compile)
    config.experts_dir = str(experts_path)
    config.checkpoint_every = 2
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def test_selmatch_run_learns_only_the_distilled_part_and_resumes(experts_dir, tmp_path):
    from ddjax.distill.run import run_distill
    from ddjax.synset import load_synset

    dataset = _dataset()
    config = _run_config(experts_dir)
    work = tmp_path / "run"
    # Killed after iteration 3: the newest checkpoint is iteration 2, so iteration 3 is redone.
    run_distill(config, str(work), compiler_options=FAST_COMPILE, _stop_after=3)
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [2]
    results = run_distill(config, str(work), compiler_options=FAST_COMPILE)
    assert results["evals"].keys() == {"0", "4"}  # eval_iterations, then the end
    synset = load_synset(work / "synset.npz")
    with np.load(work / "selmatch_init.npz") as init:
        selected, distilled = init["selected"], init["distilled"]
    scores = difficulty.forgetting_scores(experts_dir)
    expected = selmatch.initial_set(dataset, IPC, ALPHA, BETA, scores=scores)
    np.testing.assert_array_equal(selected, expected.selected_indices)
    np.testing.assert_array_equal(distilled, expected.distilled_indices)
    np.testing.assert_array_equal(synset.images[NUM_DISTILLED:], dataset.x_train[selected.ravel()])
    assert not np.allclose(synset.images[:NUM_DISTILLED], dataset.x_train[distilled.ravel()])
    np.testing.assert_array_equal(synset.labels, expected.labels)
    # Evaluated with SelMatch's protocol: fixed lr 0.1, combined augmentation from the meta.
    assert synset.meta["num_distilled"] == NUM_DISTILLED
    assert {e["learning_rate"] for e in results["evals"].values()} == {0.1}
    assert (synset.meta["alpha"], synset.meta["beta"], synset.meta["window_start"]) == (
        ALPHA, BETA, 2,
    )  # fmt: skip
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    (init_event,) = [r for r in records if r["event"] == "init"]
    assert init_event["num_frozen"] == NUM_FROZEN
    # Re-running the finished run restores its last checkpoint: the same set again.
    (work / "synset.npz").unlink()
    run_distill(config, str(work), compiler_options=FAST_COMPILE)
    np.testing.assert_array_equal(load_synset(work / "synset.npz").images, synset.images)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"alpha": 0.1}, "distils floor\\(ipc \\* alpha\\) = 0"),
        ({"beta": 6.0}, "needs floor\\(ipc \\* beta\\) \\+ ipc = 28"),
        ({"scores_higher": "easier"}, "forgetting counts are higher for harder"),
        ({"scores": "/nonexistent/cscores.npz"}, "does not exist"),
        ({"init": "real"}, "init='real' with method='selmatch'"),
        ({"soft_labels": "learned"}, "soft_labels='learned' with method='selmatch'"),
        ({"eval_iterations": (0, -1)}, "eval_iterations"),
    ],
)
def test_bad_selmatch_runs_are_refused_before_any_work(experts_dir, tmp_path, overrides, message):
    from ddjax.distill.run import run_distill

    config = _run_config(experts_dir, **overrides)
    with pytest.raises(DDJaxError, match=message):
        run_distill(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_plain_distill_config_cannot_claim_selmatch(experts_dir, tmp_path):
    from ddjax.distill.run import run_distill

    config = import_config("distill/mtt.py").mtt_fields(
        DATA, ipc=2, syn_steps=1, expert_epochs=1, max_start_epoch=2, lr_img=1.0, lr_lr=1e-3,
        lr_teacher=0.01, model=RUN_MODEL,
    )  # fmt: skip
    config.method = "selmatch"
    config.experts_dir = str(experts_dir)
    with pytest.raises(DDJaxError, match="start from configs/distill/selmatch.py"):
        run_distill(config, str(tmp_path / "run"))


def test_scores_in_another_train_order_are_refused(experts_dir, tmp_path):
    from ddjax.distill.run import run_distill

    labels = _dataset().y_train
    np.savez(tmp_path / "cscores.npz", scores=np.arange(len(labels)), labels=labels[::-1])
    config = _run_config(experts_dir, scores=str(tmp_path / "cscores.npz"), scores_higher="easier")
    with pytest.raises(DDJaxError, match="must be in the dataset's train order"):
        run_distill(config, str(tmp_path / "run"))


# (dataset, ipc) -> (alpha, beta, eval epochs, lr_img): SelMatch's scripts/distill.
PUBLISHED = {
    ("cifar10", 250): (0.6, 0.5, 1000, 1000), ("cifar10", 500): (0.2, 0.3, 500, 1000),
    ("cifar10", 1000): (0.1, 0.2, 250, 1e4), ("cifar10", 1500): (0.1, 0.2, 167, 1e4),
    ("cifar100", 25): (0.8, 0.8, 1000, 1000), ("cifar100", 50): (0.6, 0.7, 500, 1000),
    ("cifar100", 100): (0.3, 0.6, 250, 1000), ("cifar100", 150): (0.2, 0.4, 167, 1000),
    # Not published: CIFAR-10's 5 % row as ddjax's choice, epochs capped at 1000.
    ("fashion_mnist", 10): (0.6, 0.5, 1000, 1000), ("fashion_mnist", 50): (0.6, 0.5, 1000, 1000),
}  # fmt: skip


def test_configs_hold_the_published_settings():
    from ddjax import config as config_lib

    for (name, ipc), (alpha, beta, epochs, lr_img) in PUBLISHED.items():
        config = config_lib.load_config(f"configs/distill/selmatch.py:{name},ipc={ipc}")
        assert (config.dataset.name, config.ipc, config.method) == (name, ipc, "selmatch")
        assert (config.alpha, config.beta, config.eval.epochs, config.lr_img) == (
            alpha, beta, epochs, lr_img,
        )  # fmt: skip
        # SelMatch's distill.py defaults and evaluation.
        assert (config.syn_steps, config.expert_epochs, config.max_start_epoch) == (55, 2, 80)
        assert (config.lr_lr, config.lr_teacher, config.iterations) == (1e-5, 0.001, 10000)
        assert (config.model, config.eval.models, config.eval.protocol) == (
            "ConvNetBN", ("ResNet18BN",), "selmatch",
        )  # fmt: skip
        assert config.eval_iterations == (0, 500, 1000, 2500, 5000, 7500, 10000)
        assert (config.eval.num_models, config.eval.batch_size, config.dataset.zca) == (
            5, 128, False,
        )  # fmt: skip
        assert config.scores_higher == ("easier" if name.startswith("cifar") else "harder")
        if name.startswith("cifar"):
            assert config.batch_syn == 125
