"""ddjax.distill.mtt: the MTT state, ``distill_step``, its guards and the expert schedule.

Tiny nets and N = 2 inner steps; every program is compiled with XLA's fast options (see
tests/test_matching.py), which change float rounding, not what is computed.
"""

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

from ddjax import models
from ddjax.distill import core, matching
from ddjax.errors import DDJaxError

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 3
IPC = 2
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
CONFIG = core.StepConfig(
    syn_steps=2,
    expert_epochs=1,
    max_start_epoch=2,
    batch_syn=4,
    lr_img=10.0,
    lr_lr=1e-3,
)


@functools.cache
def _model():
    return models.get_model("ConvNet", NUM_CLASSES, IMAGE_SHAPE, width=3, depth=1, norm="none")


@functools.cache
def _inner(batch_sharding=None):
    return matching.InnerLoop(_model(), dsa_strategy="crop_flip", batch_sharding=batch_sharding)


@functools.cache
def _trajectories(num_experts: int = 3, num_snapshots: int = 4):
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


def _state(config=CONFIG, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(NUM_CLASSES * IPC, *IMAGE_SHAPE)).astype(np.float32)
    labels = np.repeat(np.arange(NUM_CLASSES), IPC).astype(np.int32)
    return core.init_state(images, labels, 0.01, jax.random.PRNGKey(seed), config)


@functools.cache
def _step(config=CONFIG, donate=False):
    return core.make_distill_step(_inner(), config, donate=donate, compiler_options=FAST_COMPILE)


def test_step_is_mtt_update_with_momentum():
    """Two steps equal match_loss_and_grads + PyTorch SGD(momentum=0.5), computed by hand."""
    state = _state()
    trajectories = _trajectories()
    new, metrics = _step()(state, trajectories, jnp.int32(1))
    newer, _ = _step()(new, trajectories, jnp.int32(2))

    images, lr = np.asarray(state.images), np.float32(state.inner_lr)
    buf_x, buf_lr = None, None
    current = state
    for expert in (1, 2):
        key, start_key, batch_key, augment_key = jax.random.split(current.key, 4)
        t = int(jax.random.randint(start_key, (), 0, CONFIG.max_start_epoch))
        start = jax.tree.map(lambda a, e=expert, t=t: a[e, t], trajectories)
        target = jax.tree.map(lambda a, e=expert, t=t: a[e, t + CONFIG.expert_epochs], trajectories)
        indices, mask = matching.inner_batch_indices(batch_key, len(images), 4, 2)
        loss, grads = matching.match_loss_and_grads(
            jnp.asarray(images), current.labels, lr, start, target, indices, mask,
            inner=_inner(), augment_key=augment_key,
        )  # fmt: skip
        if expert == 1:
            np.testing.assert_allclose(metrics["loss"], loss, rtol=2e-4)
            assert int(metrics["start_epoch"]) == t
        gx, glr = np.asarray(grads.images), np.float32(grads.inner_lr)
        buf_x = gx if buf_x is None else 0.5 * buf_x + gx
        buf_lr = glr if buf_lr is None else 0.5 * buf_lr + glr
        images = images - CONFIG.lr_img * buf_x
        lr = lr - CONFIG.lr_lr * buf_lr
        current = current._replace(images=jnp.asarray(images), inner_lr=jnp.float32(lr), key=key)
    np.testing.assert_allclose(newer.images, images, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(newer.inner_lr, lr, rtol=1e-4)
    assert int(newer.step) == 2
    assert not bool(metrics["skipped"])
    assert np.all(np.asarray(newer.labels) == np.asarray(state.labels))


def test_step_traces_once_across_iterations_and_experts():
    """New experts, a new subset of trajectories and new states reuse the one compiled step."""
    step = core.make_distill_step(_inner(), CONFIG, compiler_options=FAST_COMPILE)
    state = _state()
    trajectories = _trajectories()
    other_subset = jax.tree.map(lambda a: a[::-1] + 0.0, trajectories)
    for i in range(4):
        state, _ = step(state, trajectories if i < 2 else other_subset, jnp.int32(i % 3))
    assert step._cache_size() == 1
    assert int(state.step) == 4


def test_non_finite_loss_skips_the_update():
    state = _state()
    bad = jax.tree.map(lambda a: a.at[0].set(jnp.nan), _trajectories())
    new, metrics = _step()(state, bad, jnp.int32(0))
    assert bool(metrics["skipped"])
    np.testing.assert_array_equal(new.images, state.images)
    np.testing.assert_array_equal(new.inner_lr, state.inner_lr)
    assert int(new.step) == 1
    assert not np.array_equal(new.key, state.key)  # the next iteration draws afresh
    good, metrics = _step()(new, _trajectories(), jnp.int32(0))
    assert not bool(metrics["skipped"])
    assert not np.array_equal(good.images, state.images)


def test_lr_floor_keeps_the_learned_lr_positive():
    """A huge lr_lr drives α negative in plain MTT; lr_floor clips it."""
    loose = CONFIG.__class__(**{**CONFIG.__dict__, "lr_lr": 1e4})
    floored = CONFIG.__class__(**{**CONFIG.__dict__, "lr_lr": 1e4, "lr_floor": 1e-4})
    results = {}
    for name, config in (("loose", loose), ("floored", floored)):
        state = _state(config)
        for expert in range(3):
            state, _ = _step(config)(state, _trajectories(), jnp.int32(expert))
        results[name] = float(state.inner_lr)
    assert results["loose"] != pytest.approx(0.01)
    assert results["floored"] >= 1e-4
    if results["loose"] < 1e-4:
        assert results["floored"] == pytest.approx(1e-4)


def test_step_config_validation_messages():
    with pytest.raises(DDJaxError, match="syn_steps"):
        core.StepConfig(syn_steps=0).validate()
    with pytest.raises(DDJaxError, match="needs experts trained for at least 28 epochs"):
        core.StepConfig(max_start_epoch=25, expert_epochs=3).validate(num_snapshots=21)
    with pytest.raises(DDJaxError, match="mode="):
        matching.InnerLoop(_model(), mode="fast").validate()
    with pytest.raises(DDJaxError, match="lr_floor"):
        core.StepConfig(lr_floor=-1.0).validate()


def test_expert_schedule_passes_and_subsets():
    schedule = core.ExpertSchedule(num_experts=5, subset_size=2, seed=3)
    used = [schedule.subset(i) for i in range(10)]
    first_pass = [members[within] for _, members, within in used[:5]]
    second_pass = [members[within] for _, members, within in used[5:]]
    assert sorted(first_pass) == list(range(5)) == sorted(second_pass)
    # Subsets of 2, 2 and 1 experts per pass; the iteration alone determines the expert.
    assert [len(members) for _, members, _ in used[:5]] == [2, 2, 2, 2, 1]
    again = core.ExpertSchedule(num_experts=5, subset_size=2, seed=3)
    assert [again.subset(i)[1][again.subset(i)[2]] for i in range(10)] == first_pass + second_pass
    with pytest.raises(DDJaxError, match="experts_in_memory"):
        core.ExpertSchedule(num_experts=5, subset_size=0)


_DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import test_distill as t
    from ddjax import sharding
    from ddjax.distill import core
    n = jax.device_count()
    batch_sharding = None
    state, trajectories = t._state(), t._trajectories()
    if n > 1:
        mesh = sharding.make_mesh(pool=1, data=n)
        batch_sharding = NamedSharding(mesh, P("data"))
        state = sharding.replicate(state, mesh)
        trajectories = sharding.replicate(trajectories, mesh)
    config = core.StepConfig(**{{**t.CONFIG.__dict__, "batch_syn": 8, "syn_steps": 3}})
    step = core.make_distill_step(t._inner(batch_sharding), config)
    for e in range(2):
        state, metrics = step(state, trajectories, jnp.int32(e))
    np.save({out!r} + f"/images_{{n}}.npy", np.asarray(jax.device_get(state.images)))
    np.save({out!r} + f"/lr_{{n}}.npy", np.asarray(jax.device_get(state.inner_lr)))
    """
)


def test_eight_devices_give_the_same_result_as_one(tmp_path):
    """The inner minibatch split over 8 forced host devices (data axis) == one device.

    Both runs are float64 (state, experts and student follow jax_enable_x64): the split only
    reorders sums, ~1e-16 relative in float64, and two steps with lr_img=10 amplified float32's
    reordering (~1e-7) about a hundredfold, to ~1e-5, the old tolerance, which depended on the
    CPU's instruction set. 1e-10 leaves a margin of ~1e4 over float64's reordering and is still
    far below what a real difference does (statistics of one device's share: > 1e-3).
    """
    tests_dir = os.path.dirname(__file__)
    script = _DEVICE_SCRIPT.format(tests=tests_dir, out=str(tmp_path))
    for count in (1, 8):
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
        subprocess.run(
            [sys.executable, "-c", script], env=env, check=True, timeout=300, capture_output=True
        )
    images_1, images_8 = (np.load(tmp_path / f"images_{n}.npy") for n in (1, 8))
    assert images_1.dtype == np.float64
    assert not np.allclose(images_1, _state().images)  # the two steps changed the images
    np.testing.assert_allclose(images_8, images_1, rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        np.load(tmp_path / "lr_8.npy"), np.load(tmp_path / "lr_1.npy"), rtol=1e-12
    )


# --------------------------------------------------------------------------------------------
# The run: experts -> distill with checkpoints, resume and compatibility checks
# --------------------------------------------------------------------------------------------

DATA = "synthetic:classes=3,size=8,channels=1,train=24,test=12,seed=1"
RUN_MODEL = "ConvNetW8"


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    from ddjax import data, experts

    out = tmp_path_factory.mktemp("experts")
    dataset = data.load_dataset(DATA)
    experts.train_experts(
        dataset,
        out_dir=out,
        model=RUN_MODEL,
        num_experts=3,
        epochs=3,
        experts_at_once=3,
        test_every=3,
        progress=False,
    )
    return out


def _run_config(experts_path, **overrides):
    from ddjax.config import import_config

    config = import_config("distill/mtt.py").mtt_fields(
        DATA,
        ipc=2,
        syn_steps=2,
        expert_epochs=1,
        max_start_epoch=2,
        lr_img=10.0,
        lr_lr=1e-3,
        lr_teacher=0.01,
        model=RUN_MODEL,
        iterations=4,
        eval_every=4,
        eval_epochs=2,
        num_eval=1,
    )
    config.experts_dir = str(experts_path)
    config.experts_in_memory = 2  # subsets of 2, 1 (padded): loading and padding exercised
    config.checkpoint_every = 2
    config.dsa_strategy = "crop_flip"
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def test_killed_run_resumes_to_the_same_synthetic_set(experts_dir, tmp_path):
    from ddjax.distill.run import run_distill
    from ddjax.synset import load_synset

    config = _run_config(experts_dir, log_every=1)
    whole = run_distill(config, str(tmp_path / "whole"), compiler_options=FAST_COMPILE)
    # Killed after iteration 3: the newest checkpoint is iteration 2, so iteration 3 is redone.
    run_distill(config, str(tmp_path / "killed"), compiler_options=FAST_COMPILE, _stop_after=3)
    assert sorted(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir()) == [2]
    resumed = run_distill(config, str(tmp_path / "killed"), compiler_options=FAST_COMPILE)
    a = load_synset(tmp_path / "whole" / "synset.npz")
    b = load_synset(tmp_path / "killed" / "synset.npz")
    np.testing.assert_array_equal(a.images, b.images)
    assert a.learning_rate == b.learning_rate
    assert not np.array_equal(a.images, _initial_images(config))  # it did learn something
    assert whole["evals"].keys() == resumed["evals"].keys() == {"0", "4"}
    assert whole["best"]["mean"] == resumed["best"]["mean"]
    for name in ("synset_best.npz", "synset.png", "curves.png", "grids/iter_000004.png"):
        assert (tmp_path / "killed" / name).exists(), name
    # Iteration 3, logged before the kill, is logged once: the resumed run's.
    events = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").open()]
    steps = [e["iteration"] for e in events if e["event"] == "step"]
    assert steps == [1, 2, 3, 4]
    assert [e["iteration"] for e in events if e["event"] == "eval"] == [0, 4]


def _initial_images(config):
    from ddjax import data, select

    dataset = data.load_dataset(DATA)
    return select.select(dataset, "random", config.ipc, seed=config.seed).images


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": "ConvNetW4"}, "model"),
        ({"dataset.zca": True}, "ZCA|zca"),
        ({"max_start_epoch": 3}, "epochs"),
        ({"method": "selmatch"}, "start from configs/distill/selmatch.py"),
        ({"experts_dir": ""}, "experts_dir"),
    ],
)
def test_bad_runs_are_refused_before_any_work(experts_dir, tmp_path, overrides, message):
    from ddjax.distill.run import run_distill

    config = _run_config(experts_dir, **overrides)
    with pytest.raises(DDJaxError, match=message):
        run_distill(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_cli_distill_bad_input_exits_2_with_one_line(experts_dir, tmp_path, capsys):
    from ddjax import cli

    base = ["distill", "--config", "configs/distill/mtt.py:digits,ipc=1", "--workdir"]
    cases = [
        ([], "config.experts_dir is empty"),
        ([f"--config.experts_dir={experts_dir}"], "this run uses 'digits'"),
        (["--config.experts_dir=/nonexistent", "--config.mode=fast"], "mode"),
    ]
    for extra, message in cases:
        assert cli.main([*base, str(tmp_path / "run"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ddjax: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()
