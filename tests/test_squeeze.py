"""ddjax.sre2l.squeeze and ddjax.sre2l.teacher: SRe2L's squeeze recipe, the teacher on disk."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision_nets

from ddjax import config as config_lib
from ddjax import data, train
from ddjax.errors import DDJaxError
from ddjax.sre2l import squeeze
from ddjax.sre2l import teacher as teacher_lib

# 48 train images (3 classes x 16): three batches of 16 (one compiled step on CPU).
SPEC = "synthetic:classes=3,size=8,channels=1,train=16,test=8"
TINY = dict(model="ConvNetBN", width=8, epochs=3, batch_size=16, augment="crop_flip")
SQUEEZE = config_lib.import_config("squeeze/sre2l.py")  # the config family (its field list)


@pytest.fixture(scope="module")
def dataset():
    return data.load_dataset(SPEC)


def _config(**changes):
    return SQUEEZE.squeeze_fields(SPEC, **{**TINY, **changes})


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _leaves_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=False)
    )


# --------------------------------------------------------------------------------------------
# The recipe: schedule, optimiser, augmentation
# --------------------------------------------------------------------------------------------


def _torch_lrs(epochs, warmup_epochs=0, start_factor=0.01, base_lr=0.1):
    """The lr of every epoch under PyTorch's own schedulers, stepped once per epoch."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=base_lr, momentum=0.9)
    if warmup_epochs:  # torchvision's reference train.py (SRe2L's Tiny-ImageNet teacher)
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=start_factor, total_iters=warmup_epochs
        )
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs - warmup_epochs)
        scheduler = torch.optim.lr_scheduler.SequentialLR(
            optimizer, [warmup, cosine], milestones=[warmup_epochs]
        )
    else:  # squeeze_cifar.py
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.filterwarnings("ignore::UserWarning")  # SequentialLR's step(0) deprecation
def test_learning_rate_equals_pytorch_schedulers():
    ours = [squeeze.learning_rate(e, base_lr=0.1, epochs=200) for e in range(200)]
    np.testing.assert_allclose(ours, _torch_lrs(200), rtol=1e-9, atol=1e-12)
    # CosineAnnealingLR(T_max=200): lr(e) = 0.1 (1 + cos(pi e / 200)) / 2.
    assert ours[0] == 0.1 and math.isclose(ours[100], 0.05)
    assert math.isclose(ours[199], 0.05 * (1 + math.cos(math.pi * 199 / 200)))

    tiny = dict(base_lr=0.2, epochs=50, warmup_epochs=5, warmup_start_factor=0.01)
    ours = [squeeze.learning_rate(e, **tiny) for e in range(50)]
    np.testing.assert_allclose(ours, _torch_lrs(50, 5, 0.01, 0.2), rtol=1e-9, atol=1e-12)
    # Linear warm-up 0.2 (0.01 + 0.99 e / 5), then cosine over the remaining 45 epochs.
    assert math.isclose(ours[0], 0.002) and math.isclose(ours[4], 0.2 * (0.01 + 0.99 * 4 / 5))
    assert math.isclose(ours[5], 0.2)
    assert math.isclose(ours[27], 0.1 * (1 + math.cos(math.pi * 22 / 45)))


def test_sgd_step_is_weight_decay_then_momentum_on_every_parameter(finished):
    settings = squeeze.SqueezeSettings(lr=0.1, momentum=0.9, weight_decay=0.05)
    tx = squeeze.make_optimizer(settings)
    params = finished[1].variables["params"]  # ConvNetBN: conv kernels/biases, BN, head
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)]
    grads.append(jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params))

    # PyTorch SGD (weight_decay, momentum, no dampening/nesterov), on every parameter:
    # d = g + wd p;  buf = d at the first step, else m buf + d;  p <- p - lr buf.
    opt_state = tx.init(params)
    ours, theirs, buf = params, params, None
    for t, (lr, g) in enumerate(zip((0.1, 0.05), grads, strict=True)):
        opt_state = train.set_learning_rate(opt_state, lr)
        updates, opt_state = tx.update(g, opt_state, ours)
        ours = optax.apply_updates(ours, updates)
        d = jax.tree.map(lambda g, p: g + 0.05 * p, g, theirs)
        buf = d if t == 0 else jax.tree.map(lambda b, d: 0.9 * b + d, buf, d)
        theirs = jax.tree.map(lambda p, b, lr=lr: p - lr * b, theirs, buf)
        jax.tree.map(_close, ours, theirs)
        if t == 0:
            after_first = ours
    # BatchNorm's scale and bias are decayed like every other parameter (SRe2L hands
    # model.parameters() to one SGD group); leaving them out would give different values.
    for leaf in ("scale", "bias"):
        value, gradient = params["norm_0"][leaf], grads[0]["norm_0"][leaf]
        assert not np.allclose(after_first["norm_0"][leaf], value - 0.1 * gradient, atol=1e-6)


def test_crop_flip_pads_with_black_pixels_and_rrc_keeps_the_shape(dataset):
    images = jnp.full((64, 8, 8, 1), 1.5, jnp.float32)
    out = squeeze.make_augment("crop_flip", dataset)(jax.random.key(0), images)
    black = -dataset.mean[0] / dataset.std[0]  # pixel 0 after Normalize
    values = np.unique(np.round(np.asarray(out), 5))
    np.testing.assert_allclose(values, sorted([black, 1.5]), rtol=1e-5)
    assert np.all(dataset.to_pixels(np.asarray(out))[np.asarray(out) < 0] == 0)

    rrc = squeeze.make_augment("rrc_flip", dataset)
    ramp = jnp.broadcast_to(jnp.arange(8.0)[None, None, :, None], (4, 8, 8, 1))
    crops = jax.jit(rrc)(jax.random.key(3), ramp)
    assert crops.shape == ramp.shape and not np.allclose(crops, ramp)
    assert float(crops.min()) >= 0.0 and float(crops.max()) <= 7.0  # convex combinations


# --------------------------------------------------------------------------------------------
# The driver: resume, compile once, the saved teacher
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny uninterrupted run: ConvNetBN width 8, 3 epochs, crop+flip, cosine."""
    workdir = tmp_path_factory.mktemp("squeeze") / "whole"
    return workdir, squeeze.run_squeeze(_config(), workdir, progress=False)


def _epochs(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [
        {k: v for k, v in r.items() if k != "time"}
        for r in records
        if r["event"] == "squeeze_epoch"
    ]


def test_killed_run_resumes_bit_identical(finished, tmp_path):
    whole_dir, whole = finished
    workdir = tmp_path / "killed"
    assert squeeze.run_squeeze(_config(), workdir, progress=False, _stop_after_epochs=1) is None
    assert not (workdir / "teacher").exists()
    assert [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()] == [1]
    resumed = squeeze.run_squeeze(_config(), workdir, progress=False)
    assert _leaves_equal(resumed.variables, whole.variables)
    assert resumed.meta["extra"] == whole.meta["extra"]
    assert [e["epoch"] for e in _epochs(workdir)] == [1, 2, 3]
    assert _epochs(workdir) == _epochs(whole_dir)
    # Finished: a third call only reads the teacher back.
    again = squeeze.run_squeeze(_config(), workdir, progress=False)
    assert _leaves_equal(again.variables, whole.variables)
    assert len(_epochs(workdir)) == 3


def test_finished_run_saves_teacher_with_accuracy_and_lr_schedule(finished, dataset):
    workdir, teacher = finished
    results = json.loads((workdir / "results.json").read_text())
    assert teacher.meta["extra"]["test_accuracy"] == results["test_accuracy"]
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert teacher.meta["model"] == "ConvNetBN" and teacher.meta["model_overrides"] == {"width": 8}
    assert teacher_lib.has_batchnorm(teacher.variables)
    teacher_lib.check_teacher(teacher, dataset)
    lrs = [e["lr"] for e in _epochs(workdir)]
    np.testing.assert_allclose(
        lrs, [squeeze.learning_rate(e, base_lr=0.1, epochs=3) for e in range(3)]
    )
    # The saved teacher is the trained network: its eval-mode accuracy is the logged one.
    logits = teacher.model.apply(teacher.variables, dataset.x_test, train=False)
    accuracy = float(np.mean(np.argmax(logits, -1) == dataset.y_test))
    assert accuracy == pytest.approx(results["test_accuracy"])
    with pytest.raises(DDJaxError, match="different config"):
        squeeze.run_squeeze(_config(lr=0.2), workdir, progress=False)


def test_scan_epoch_compiles_once(dataset, monkeypatch):
    traces = []
    make_augment = squeeze.make_augment

    def counting(name, real_data):
        fn = make_augment(name, real_data)
        return lambda key, images: traces.append(images.shape) or fn(key, images)

    monkeypatch.setattr(squeeze, "make_augment", counting)
    squeeze._programs.cache_clear()  # build the programs anew, with the counting augmentation
    settings = squeeze.SqueezeSettings(
        **{**TINY, "epoch_mode": "scan", "test_every": 3, "augment": "none", "batch_size": 20}
    )
    result = squeeze.train_teacher(dataset, settings)
    # One trace of the scanned full batch of 20 and one of the last batch of 8, for all three
    # epochs (the per-epoch learning rate is state, not a compile-time constant).
    assert sorted(traces) == [(8, 8, 8, 1), (20, 8, 8, 1)]
    assert np.all(np.isfinite(result.train_loss)) and np.isnan(result.test_accuracy[0])
    assert np.isfinite(result.test_accuracy[2])


# --------------------------------------------------------------------------------------------
# Teacher files
# --------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_contract(finished, dataset, tmp_path):
    _, teacher = finished
    path = tmp_path / "t"
    extra = {"test_accuracy": 0.5, "note": "round trip"}
    for _ in range(2):  # the second save replaces the first
        teacher_lib.save_teacher(
            path,
            model_name="ConvNetBN",
            model_overrides={"width": 8},
            variables=teacher.variables,
            dataset=dataset,
            extra=extra,
        )
    assert sorted(os.listdir(tmp_path)) == ["t"]  # no staging or replaced directories left
    loaded = teacher_lib.load_teacher(path)
    assert _leaves_equal(loaded.variables, teacher.variables)
    assert loaded.model == teacher.model and loaded.meta["extra"] == extra
    meta = json.loads((path / "teacher.json").read_text())
    for field, value in (
        ("dataset", SPEC),
        ("zca", False),
        ("normalisation", "mean_std"),
        ("image_shape", [8, 8, 1]),
        ("num_classes", 3),
        ("mean", list(dataset.mean)),
        ("std", list(dataset.std)),
    ):
        assert meta[field] == value, field
    teacher_lib.check_teacher(loaded, dataset)

    other = data.load_dataset(SPEC.replace("classes=3", "classes=4"))
    with pytest.raises(DDJaxError, match="dataset="):
        teacher_lib.check_teacher(loaded, other)
    renamed = dataclasses.replace(other, name=SPEC)
    with pytest.raises(DDJaxError, match="num_classes=3"):
        teacher_lib.check_teacher(loaded, renamed)
    shifted = dataclasses.replace(dataset, mean=(0.1,))
    with pytest.raises(DDJaxError, match="normalised with mean="):
        teacher_lib.check_teacher(loaded, shifted)
    whitened = data.load_dataset(SPEC, zca=True)
    with pytest.raises(DDJaxError, match="ZCA off, this run has ZCA on"):
        teacher_lib.check_teacher(loaded, whitened)
    with pytest.raises(DDJaxError, match="ConvNetBN"):  # variables of another model
        teacher_lib.save_teacher(
            tmp_path / "bad",
            model_name="ConvNetBN",
            model_overrides={"width": 16},
            variables=teacher.variables,
            dataset=dataset,
        )
    assert not (tmp_path / "bad").exists()


def test_load_teacher_errors(finished, tmp_path):
    _, teacher = finished
    with pytest.raises(DDJaxError, match="not a ddjax teacher"):
        teacher_lib.load_teacher(tmp_path / "missing")
    path = tmp_path / "t"
    teacher_lib.save_teacher(
        path,
        model_name="ConvNetBN",
        model_overrides={"width": 8},
        variables=teacher.variables,
        dataset=data.load_dataset(SPEC),
    )
    meta_file = path / "teacher.json"
    good = meta_file.read_text()
    meta_file.write_text(good[:40])
    with pytest.raises(DDJaxError, match="teacher is corrupt"):
        teacher_lib.load_teacher(path)
    meta_file.write_text(json.dumps({**json.loads(good), "model": "NoSuchNet"}))
    with pytest.raises(DDJaxError, match="unknown model 'NoSuchNet'"):
        teacher_lib.load_teacher(path)
    meta_file.write_text(json.dumps({**json.loads(good), "model_overrides": {"width": 16}}))
    with pytest.raises(DDJaxError, match="does not match|cannot be read"):
        teacher_lib.load_teacher(path)
    meta_file.write_text(good)
    (path / "variables" / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(DDJaxError, match="not a complete checkpoint"):
        teacher_lib.load_teacher(path)


# --------------------------------------------------------------------------------------------
# PyTorch import
# --------------------------------------------------------------------------------------------


def test_import_torch_teacher_gives_pytorch_eval_logits(tmp_path):
    dataset = data.load_dataset("synthetic:classes=3,size=16,channels=3,train=4,test=4")
    torch.manual_seed(0)
    # torchvision's resnet18 as SRe2L modifies it (3x3/1 conv1, no max-pool), narrow to be fast.
    net = torchvision_nets.ResNet(18, 3, width=4, small_stem=True)
    torchvision_nets.randomise_batchnorm(net, seed=0)
    net.eval()
    images = dataset.x_test
    with torch.no_grad():
        expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()

    overrides = {"width": 4, "conv_init": "torchvision"}
    teacher = teacher_lib.import_torch_teacher(
        net.state_dict(), model_name="ResNet18BN", model_overrides=overrides, dataset=dataset
    )
    logits = jax.jit(lambda v, x: teacher.model.apply(v, x, train=False))(teacher.variables, images)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(
        teacher.variables["batch_stats"]["layer2_0"]["shortcut_norm"]["var"],
        net.layer2[0].downsample[1].running_var.numpy(),
    )
    assert teacher_lib.has_batchnorm(teacher.variables)

    # SRe2L's squeeze_cifar.py checkpoint: {'state_dict': DataParallel keys, 'acc', 'epoch'}.
    file = tmp_path / "ckpt.pth"
    wrapped = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": wrapped, "acc": 12.5, "epoch": 199}, file)
    from_file = teacher_lib.import_torch_teacher(
        file, model_name="ResNet18BN", model_overrides=overrides, dataset=dataset
    )
    assert _leaves_equal(from_file.variables, teacher.variables)
    assert from_file.meta["extra"]["file"] == str(file.absolute())

    saved = tmp_path / "teacher"
    teacher_lib.save_teacher(
        saved,
        model_name="ResNet18BN",
        model_overrides=overrides,
        variables=from_file.variables,
        dataset=dataset,
        extra=from_file.meta["extra"],
    )
    assert _leaves_equal(teacher_lib.load_teacher(saved).variables, teacher.variables)

    with pytest.raises(DDJaxError, match="fc.weight"):  # 3 classes in the file, 4 here
        other = data.load_dataset("synthetic:classes=4,size=16,channels=3,train=4,test=4")
        teacher_lib.import_torch_teacher(
            file, model_name="ResNet18BN", model_overrides=overrides, dataset=other
        )
    with pytest.raises(DDJaxError, match="does not exist"):
        teacher_lib.import_torch_teacher(
            tmp_path / "nope.pth", model_name="ResNet18BN", model_overrides={}, dataset=dataset
        )
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DDJaxError, match="cannot read PyTorch checkpoint"):
        teacher_lib.import_torch_teacher(
            tmp_path / "junk.pth", model_name="ResNet18BN", model_overrides={}, dataset=dataset
        )


# --------------------------------------------------------------------------------------------
# Configs and errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", dict(lr=0.1, batch_size=128, epochs=200, weight_decay=5e-4, warmup_epochs=0)),
        (
            "cifar100",
            dict(lr=0.1, batch_size=128, epochs=200, weight_decay=5e-4, augment="crop_flip"),
        ),
        (
            "tiny_imagenet",
            dict(
                lr=0.2,
                batch_size=256,
                epochs=50,
                weight_decay=1e-4,
                warmup_epochs=5,
                augment="rrc_flip",
            ),
        ),
        ("fashion_mnist", dict(model="ResNet18BN", augment="crop_flip")),
        ("digits", dict(model="ConvNetBN", width=32, augment="none")),
    ],
)
def test_config_files_hold_the_recipes(name, expected):
    config = config_lib.load_config(f"configs/squeeze/sre2l.py:{name}")
    settings = squeeze.settings_from_config(config)
    for field, value in expected.items():
        assert getattr(settings, field) == value, field
    assert settings.momentum == 0.9 and settings.warmup_start_factor == 0.01
    if settings.model == "ResNet18BN":
        assert settings.model_overrides() == {"conv_init": "torchvision"}
    config_lib.apply_override(config, "epochs=7")  # the CLI's --config.epochs=7
    assert squeeze.settings_from_config(config).epochs == 7


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model="NoSuchNet"), "unknown model 'NoSuchNet'"),
        (dict(model="ConvNet"), "squeeze needs a BatchNorm model"),
        (dict(lr=0.0), "lr=0.0 must be a positive number"),
        (dict(lr=float("nan")), "lr=nan must be a positive number"),
        (dict(epochs=0), "epochs=0 must be an integer >= 1"),
        (dict(momentum=1.0), "momentum=1.0 must be in"),
        (dict(weight_decay=-1e-4), "weight_decay=-0.0001 must be >= 0"),
        (dict(warmup_epochs=3), "warmup_epochs=3 must be smaller than epochs=3"),
        (dict(warmup_start_factor=0.0), "warmup_start_factor=0.0 must be in"),
        (dict(augment="autoaugment"), "augment='autoaugment' is not known"),
        (dict(epoch_mode="pmap"), "epoch_mode='pmap' is not known"),
        (dict(conv_init="xavier"), "conv_init='xavier'"),
        (dict(width=0), "width=0 must be a positive integer"),
    ],
)
def test_bad_settings_are_refused_in_one_line(dataset, changes, message, tmp_path):
    settings = squeeze.SqueezeSettings(**{**TINY, **changes})
    with pytest.raises(DDJaxError, match=message) as error:
        squeeze.check_settings(settings, dataset)
    assert "\n" not in str(error.value)
    with pytest.raises(DDJaxError, match=message):  # the driver refuses before any file
        squeeze.run_squeeze(_config(**changes), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_imagenet_zca_and_unknown_fields_are_refused(dataset, tmp_path):
    for name in ("imagenet2012", "tfds:imagenet2012", "imagenet-1k"):
        with pytest.raises(DDJaxError, match="ddjax teacher --config configs/teacher/torchvision"):
            SQUEEZE.squeeze_fields(name)
    config = _config()
    config.dataset.name = "imagenet2012"
    with pytest.raises(DDJaxError, match="pretrained resnet18"):
        squeeze.run_squeeze(config, tmp_path / "in1k", progress=False)
    squeeze.check_squeezable("folder:/data/tiny-imagenet-200")  # Tiny-ImageNet is squeezed
    with pytest.raises(DDJaxError, match="zca must be False"):
        squeeze.check_settings(squeeze.SqueezeSettings(**TINY), data.load_dataset(SPEC, zca=True))
    with pytest.raises(DDJaxError, match="unknown field 'learning_rate'"):
        SQUEEZE.squeeze_fields("cifar10", learning_rate=0.1)
