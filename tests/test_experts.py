"""ddjax.experts: MTT's expert recipe, trajectories on disk, forgetting counts, resume, CLI."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from ddjax import augment, cli, data, experts, models, train
from ddjax.errors import DDJaxError
from ddjax.workdir import Workdir

# 48 train images (3 classes x 16) in three batches of 16 (partial batches: tests/test_train.py).
SPEC = "synthetic:classes=3,size=8,channels=1,train=16,test=8"
SETTINGS = dict(
    model="ConvNet",
    model_overrides={"width": 8},
    num_experts=3,
    epochs=3,
    batch_size=16,
    seed=0,
    progress=False,
)


@pytest.fixture(scope="module")
def dataset():
    return data.load_dataset(SPEC)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """Three experts trained side by side in one uninterrupted run."""
    out = tmp_path_factory.mktemp("experts") / "reference"
    experts.train_experts(dataset, out_dir=out, experts_at_once=3, **SETTINGS)
    return out


def _net_and_step():
    net = models.get_model("ConvNet", 3, (8, 8, 1), width=8)
    tx = train.sgd(0.01)  # MTT: lr 0.01, no momentum, no weight decay
    # with_correct=True: the step the experts use (it trains exactly like the plain one, see
    # tests/test_train.py), so that these tests reuse its compiled program.
    step = train.make_train_step(net, tx, augment.make_augment("dsa"), with_correct=True)
    return net, tx, step


def _init_state(net, tx, key):
    """``train.init_state`` through ``models.init_variables`` (the same numbers, compiled once).

    Committed to the device as the experts' states are, so that these tests reuse the experts'
    compiled programs instead of compiling their own (jit specialises on committed inputs).
    """
    params = models.init_variables(net, key, (8, 8, 1))["params"]
    return jax.device_put(train.TrainState(params, {}, tx.init(params)), jax.devices()[0])


def _equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_trajectory_is_the_init_then_every_epoch_of_train_fit(reference, dataset):
    net, tx, step = _net_and_step()
    trajectories = experts.load_trajectories(reference, [0, 2])
    shapes = models.variable_shapes(net, (8, 8, 1))["params"]
    for leaf, shape in zip(jax.tree.leaves(trajectories), jax.tree.leaves(shapes), strict=True):
        assert leaf.shape == (2, 4, *shape.shape) and leaf.dtype == np.float32
    for row, index in enumerate([0, 2]):
        init_key, train_key = experts.expert_keys(0, index)
        state = _init_state(net, tx, init_key)
        snapshot = lambda epoch, row=row: jax.tree.map(lambda x: x[row, epoch], trajectories)
        assert _equal(snapshot(0), state.params)
        # The whole recipe: plain SGD at lr 0.01, DSA, batch 16 here, keys of (seed, index).
        for epoch in (1, 3):
            trained, _ = train.fit(
                state, step, dataset.x_train, dataset.y_train, train_key, epoch, batch_size=16
            )
            assert _equal(snapshot(epoch), trained.params)


def test_forgetting_counts_follow_the_correctness_of_each_presentation(reference, dataset):
    # Replay expert 1: each epoch reports every example's correctness when it was trained on.
    net, tx, step = _net_and_step()
    epoch_fn = train.make_loop_epoch(step, 16)
    init_key, train_key = experts.expert_keys(0, 1)
    state = _init_state(net, tx, init_key)
    # Inputs committed to the device, as the experts' are (see _init_state).
    device = jax.devices()[0]
    images, labels = jax.device_put((dataset.x_train, dataset.y_train), device)
    history = []
    for epoch in range(3):
        key = jax.device_put(experts.epoch_key(train_key, epoch), device)
        state, (_, correct) = epoch_fn(state, images, labels, key)
        history.append(np.asarray(correct))
    history = np.stack(history)
    # Toneva et al.: an event is "correct at one presentation, wrong at the next"; examples that
    # are never correct get the number of presentations. Counted here directly in NumPy.
    events = (history[:-1] & ~history[1:]).sum(0)
    expected = np.where(history.any(0), events, 3)
    assert (expected == 3).any() and (expected < 3).any()

    saved = np.load(reference / "forgetting.npz")
    np.testing.assert_array_equal(saved["experts"], [0, 1, 2])
    np.testing.assert_array_equal(saved["counts"][1], expected)
    np.testing.assert_array_equal(saved["labels"], dataset.y_train)
    np.testing.assert_array_equal(saved["sum"], saved["counts"].sum(0))
    np.testing.assert_allclose(experts.forgetting_scores(reference), saved["counts"].mean(0))
    meta = experts.read_meta(reference)
    np.testing.assert_allclose(meta["experts"]["1"]["train_accuracy"], history.mean(1), atol=1e-6)


def test_forgetting_events_of_hand_written_sequences():
    presentations = np.array(
        [
            [1, 0, 1, 0, 1, 1],  # learned, forgotten twice
            [0, 0, 0, 0, 0, 0],  # never learned: counts as 6 (the number of presentations)
            [0, 1, 1, 1, 1, 1],  # learned once and kept
            [1, 1, 1, 1, 1, 0],  # forgotten at the very end
            [0, 1, 0, 0, 1, 0],  # two events
        ],
        bool,
    ).T
    state = experts.forgetting_init(5)
    for correct in presentations:
        state = experts.forgetting_update(state, correct)
    np.testing.assert_array_equal(state.events, [2, 0, 0, 1, 2])
    np.testing.assert_array_equal(experts.forgetting_counts(state, 6), [2, 6, 0, 1, 2])


def test_grouping_and_interruptions_do_not_change_the_experts(reference, dataset, tmp_path):
    out = tmp_path / "resumed"
    work = Workdir(out, ml_collections.ConfigDict({"experts": "test"}), "experts")
    logged = dict(log=work.log, rewind=work.rewind)
    run = dict(dataset=dataset, out_dir=out, checkpoint_every=2, **logged, **SETTINGS)
    # Killed after 2 epochs of experts 0-1 (trained two at a time): a checkpoint at epoch 2.
    experts.train_experts(experts_at_once=2, _stop_after_epochs=2, **run)
    assert experts.completed(out) == []
    assert (out / "_partial" / "checkpoints" / "2").is_dir()
    # Resumed one at a time: experts 0-1 finish from epoch 2, expert 2 is killed after its
    # last epoch, before it is saved (its checkpoint is at epoch 2).
    experts.train_experts(experts_at_once=1, _stop_after_epochs=4, **run)
    assert experts.completed(out) == [0, 1]
    assert json.loads((out / "_partial" / "group.json").read_text()) == {"experts": [2]}
    experts.train_experts(experts_at_once=1, **run)
    assert experts.completed(out) == [0, 1, 2] and not (out / "_partial").exists()

    indices = [0, 1, 2]
    assert _equal(
        experts.load_trajectories(out, indices), experts.load_trajectories(reference, indices)
    )
    resumed, uninterrupted = np.load(out / "forgetting.npz"), np.load(reference / "forgetting.npz")
    for name in uninterrupted.files:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name])
    assert experts.read_meta(out)["experts"] == experts.read_meta(reference)["experts"]
    # Each epoch of each group logged once: expert 2's epoch 3, lost with the kill, was
    # trained and logged again from its checkpoint at epoch 2.
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [(e["experts"], e["epoch"]) for e in events if e["event"] == "expert_epoch"]
    assert epochs == [([0, 1], 1), ([0, 1], 2), ([0, 1], 3), ([2], 1), ([2], 2), ([2], 3)]


def test_a_finished_run_does_nothing_and_other_settings_are_refused(reference, dataset):
    events = []
    experts.train_experts(
        dataset, out_dir=reference, log=lambda **e: events.append(e), experts_at_once=1, **SETTINGS
    )
    assert events == []
    with pytest.raises(DDJaxError, match=r"trained with lr=0\.01; this run has lr=0\.02"):
        experts.train_experts(dataset, out_dir=reference, **{**SETTINGS, "lr": 0.02})
    with pytest.raises(DDJaxError, match=r"model_overrides=\{'width': 8\}; this run has"):
        experts.train_experts(dataset, out_dir=reference, **{**SETTINGS, "model_overrides": {}})


def test_load_trajectories_stacks_the_requested_experts_in_order(reference):
    stacked = experts.load_trajectories(reference, [2, 0, 2])
    for row, index in enumerate([2, 0, 2]):
        one = experts.load_trajectory(reference, index)
        assert _equal(jax.tree.map(lambda x, row=row: x[row], stacked), one)
    assert not _equal(experts.load_trajectory(reference, 0), experts.load_trajectory(reference, 2))
    with pytest.raises(
        DDJaxError, match=r"expert 7 is not a completed expert .*\(completed: 0-2\)"
    ):
        experts.load_trajectories(reference, [0, 7])


def test_metadata_records_the_run(reference, dataset):
    meta = experts.read_meta(reference)
    assert meta["completed"] == [0, 1, 2]
    assert (meta["dataset"], meta["zca"], meta["num_train"]) == (SPEC, False, 48)
    assert (meta["model"], meta["model_overrides"], meta["epochs"]) == ("ConvNet", {"width": 8}, 3)
    assert (meta["lr"], meta["momentum"], meta["batch_size"], meta["augment"]) == (
        0.01,
        0.0,
        16,
        "dsa",
    )
    assert meta["mean"] == list(dataset.mean) and meta["image_shape"] == [8, 8, 1]
    result = meta["experts"]["0"]
    assert sorted(result["test_accuracy"]) == ["1", "2", "3"]
    assert result["final_test_accuracy"] == result["test_accuracy"]["3"]
    with pytest.raises(DDJaxError, match="has no experts.json"):
        experts.read_meta(reference.parent)


COMPATIBLE = dict(
    dataset_name=SPEC,
    zca=False,
    model="ConvNet",
    model_overrides={"width": 8},
    image_shape=(8, 8, 1),
    num_classes=3,
    min_epochs=3,
)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "ConvNetBN"}, "were trained with model='ConvNet', this run uses 'ConvNetBN'"),
        ({"zca": True}, "were trained with ZCA off, this run has ZCA on"),
        ({"dataset_name": "digits"}, f"were trained on dataset='{SPEC}', this run uses 'digits'"),
        ({"model_overrides": {}}, "model_overrides={'width': 8}, this run uses {}"),
        ({"num_classes": 10}, "num_classes=3, this run uses 10"),
        ({"std": (1.0,)}, "were trained on images normalised with std=["),
        ({"image_shape": (16, 16, 1)}, "image_shape=[8, 8, 1], this run uses [16, 16, 1]"),
        (
            {"min_epochs": 22, "min_epochs_reason": "max_start_epoch + expert_epochs = 22"},
            "max_start_epoch + expert_epochs = 22 needs at least 22 epochs, experts in",
        ),
    ],
)
def test_check_compatible_names_the_field_and_both_values(reference, change, message):
    meta = experts.read_meta(reference)
    experts.check_compatible(meta, **COMPATIBLE)  # the run's own settings pass
    experts.check_compatible(meta, mean=meta["mean"], std=meta["std"], **COMPATIBLE)
    with pytest.raises(DDJaxError, match=re.escape(message)) as error:
        experts.check_compatible(meta, **{**COMPATIBLE, **change})
    assert str(reference) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, "epochs=0 must be an integer >= 1"),
        ({"num_experts": 0}, "num_experts=0"),
        ({"lr": 0.0}, "lr=0.0 must be a positive number"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"augment": "flip"}, "augmentation='flip'"),
        ({"model": "ConvNeXt"}, "unknown model 'ConvNeXt'"),
        ({"pool_mode": "pmap"}, "pool_mode='pmap'"),
        ({"test_limit": 0}, "test_limit=0"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(dataset, tmp_path, change, message):
    with pytest.raises(DDJaxError, match=re.escape(message)):
        experts.train_experts(dataset, out_dir=tmp_path / "x", **{**SETTINGS, **change})
    assert not (tmp_path / "x").exists()


# Trains into argv[1] with the settings of argv[2] on two (forced) CPU devices, killed once and
# resumed: the pool of two experts is sharded over the devices, one expert each.
_TWO_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    from ddjax import data, experts
    assert jax.device_count() == 2
    run = dict(json.loads(sys.argv[2]), out_dir=sys.argv[1], checkpoint_every=1)
    dataset = data.load_dataset(run.pop("spec"))
    experts.train_experts(dataset, _stop_after_epochs=1, **run)
    experts.train_experts(dataset, **run)
    """
)


def test_pools_train_the_same_experts_vmapped_looped_and_sharded(dataset, tmp_path):
    """All three trained in float64 (the networks follow jax_enable_x64): the pool forms only
    reorder sums (~1e-16 relative, grown by two epochs to ~1e-13 at most), and the stored
    float32 trajectories round those values once, so they agree to one float32 ulp (2^-23
    relative; float32 training grew its ~1e-7 reordering to ~1e-5, the old tolerance, which
    depended on the CPU's instruction set) and the forgetting counts are identical."""
    # No augmentation: a vmapped DSA compiles slowly on CPU, and the pool plumbing is the point.
    run = dict(SETTINGS, num_experts=2, epochs=2, augment="none", experts_at_once=2)
    with jax.enable_x64(True):
        experts.train_experts(dataset, out_dir=tmp_path / "loop", pool_mode="loop", **run)
        experts.train_experts(dataset, out_dir=tmp_path / "vmap", pool_mode="vmap", **run)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    settings = json.dumps(dict(run, spec=SPEC, pool_mode="vmap"))
    subprocess.run(
        [sys.executable, "-c", _TWO_DEVICE_SCRIPT, str(tmp_path / "sharded"), settings],
        env=env,
        check=True,
        timeout=300,
    )
    loop = experts.load_trajectories(tmp_path / "loop", [0, 1])
    for mode in ("vmap", "sharded"):
        other = experts.load_trajectories(tmp_path / mode, [0, 1])
        for a, b in zip(jax.tree.leaves(loop), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(a, b, rtol=2**-22)
        counts = [np.load(tmp_path / m / "forgetting.npz")["counts"] for m in ("loop", mode)]
        np.testing.assert_array_equal(counts[0], counts[1])


# The CLI on the same tiny data and network as `reference` (ConvNetW8 is ConvNet width 8).
CLI_ARGS = [
    f"--config.dataset.name={SPEC}",
    "--config.model=ConvNetW8",
    "--config.num_experts=1",
    "--config.epochs=3",
    "--config.batch_size=16",
]


def test_cli_trains_experts_into_the_workdir_and_resumes(reference, tmp_path, capsys):
    work = tmp_path / "cli"
    argv = [
        "experts",
        "--config",
        "configs/experts/mtt.py:digits",
        "--workdir",
        str(work),
        *CLI_ARGS,
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "experts 0: final test accuracy" in out and "experts: 1/1 complete" in out
    assert json.loads((work / "config.json").read_text())["stage"] == "experts"
    assert json.loads((work / "results.json").read_text())["completed"] == 1
    lines = (work / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["expert_epoch"] * 3 + ["experts_done"]
    assert [e["epoch"] for e in events[:3]] == [1, 2, 3]
    # The CLI is the library: the same expert as the reference run's expert 0.
    assert _equal(experts.load_trajectory(work, 0), experts.load_trajectory(reference, 0))
    assert cli.main(argv) == 0  # a finished run: nothing to do
    assert (work / "metrics.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.epochs=0"], "epochs=0"),
        (["--config.model=Nope"], "unknown model 'Nope'"),
        (["--config.augment=flip"], "augmentation='flip'"),
        (["--config.experts_at_once=0"], "experts_at_once=0"),
        (["--config.epochs=ten"], "--config.epochs='ten': expected int"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, extra, message):
    work = tmp_path / "w"
    argv = ["experts", "--workdir", str(work), *CLI_ARGS, *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddjax: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not work.exists()


def test_cli_help_explains_the_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["experts", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ["expert_NNNN", "experts.json", "forgetting.npz", "--config", "--workdir"]:
        assert phrase in text
