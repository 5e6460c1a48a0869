"""ddjax.sre2l.recover: SRe2L's recover objective, step, batching and resumable run.

Tiny BatchNorm teachers (ConvNet-BN of width 4-8 on 8-px images, ResNet-18 of width 2); the
references are NumPy, PyTorch (forward hooks, as SRe2L computes the loss) and torch.optim.Adam.
Steps are compiled with XLA's fast options (see tests/test_matching.py), which change float
rounding, not what is computed.
"""

import functools
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import data, models
from ddjax.config import import_config, load_config
from ddjax.errors import DDJaxError
from ddjax.sre2l import recover, recover_step, teacher

IMAGE_SHAPE = (8, 8, 3)
NUM_CLASSES = 4
DATA = "synthetic:classes=4,size=8,channels=3,train=16,test=8,seed=1"
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
SETTINGS = recover_step.RecoverSettings(
    iterations=4, lr=0.25, r_bn=0.01, mean=MEAN, std=STD, jitter=(0, 2), crop_scale=(0.3, 1.0)
)


@functools.cache
def _bn_net(width=4, depth=2):
    """ConvNet-BN with random parameters *and* random running statistics (a 'trained' look)."""
    model = models.get_model("ConvNetBN", NUM_CLASSES, IMAGE_SHAPE, width=width, depth=depth)
    variables = models.init_variables(model, _init_key(width), IMAGE_SHAPE)
    rng = np.random.default_rng(width)

    def running(path, leaf):
        if path[-1].key == "mean":
            return jnp.asarray(rng.normal(0.0, 0.5, leaf.shape), jnp.float32)
        return jnp.asarray(rng.uniform(0.2, 1.5, leaf.shape), jnp.float32)

    stats = jax.tree_util.tree_map_with_path(running, variables["batch_stats"])
    return model, {"params": variables["params"], "batch_stats": stats}


def _init_key(seed):
    # rbg keys: XLA:CPU compiles threefry initialisation slowly (see models.init_variables).
    return jax.random.key(seed, impl="rbg")


def _images(n=NUM_CLASSES, seed=0, shape=IMAGE_SHAPE):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


def _numpy_conv(x, kernel, bias):
    """3×3 'same' convolution, NHWC × HWIO, in float64 loops over the kernel taps."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy : dy + h, dx : dx + w, :] @ kernel[dy, dx]
    return out + bias


def test_loss_equals_a_direct_numpy_computation():
    """CE + r_bn·(10·term_0 + term_1) with the BN inputs captured by hand, biased var, L2."""
    model, variables = _bn_net()
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    stats = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    images = _images()
    labels = np.array([2, 0, 3, 1])

    x = images.astype(np.float64)
    bn_terms = []
    for d in range(2):
        x = _numpy_conv(x, params[f"conv_{d}"]["kernel"], params[f"conv_{d}"]["bias"])
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))  # the hook: biased variance
        running = stats[f"norm_{d}"]
        bn_terms.append(
            np.linalg.norm(var - running["var"]) + np.linalg.norm(mean - running["mean"])
        )
        # eval-mode BatchNorm with the running statistics, ReLU, 2×2 average pool
        norm = params[f"norm_{d}"]
        x = (x - running["mean"]) / np.sqrt(running["var"] + 1e-5) * norm["scale"] + norm["bias"]
        x = np.maximum(x, 0)
        x = x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, -1).mean(axis=(2, 4))
    features = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # PyTorch's (C, H, W) flatten
    logits = features @ params["classifier"]["kernel"] + params["classifier"]["bias"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ce = -log_probs[np.arange(4), labels].mean()
    bn = 10.0 * bn_terms[0] + bn_terms[1]

    loss_fn = functools.partial(recover_step.recover_loss, model, r_bn=0.05)
    loss, parts = jax.jit(loss_fn, compiler_options=FAST_COMPILE)(variables, images, labels)
    np.testing.assert_allclose(parts["bn_layers"], bn_terms, rtol=2e-5)
    np.testing.assert_allclose(parts["ce"], ce, rtol=2e-5)
    np.testing.assert_allclose(parts["bn"], bn, rtol=2e-5)
    np.testing.assert_allclose(loss, ce + 0.05 * bn, rtol=2e-5)
    np.testing.assert_allclose(parts["bn_mean"] + parts["bn_var"], parts["bn_layers"], rtol=1e-6)


def _torch_convnet_bn(width, depth, state_dict):
    """MTT's ConvNet with BatchNorm in PyTorch (``features.*``, ``classifier``)."""
    import torch

    layers, channels = [], 3
    for _ in range(depth):
        layers += [
            torch.nn.Conv2d(channels, width, 3, padding=1),
            torch.nn.BatchNorm2d(width),
            torch.nn.ReLU(),
            torch.nn.AvgPool2d(2, 2),
        ]
        channels = width
    net = torch.nn.Module()
    net.features = torch.nn.Sequential(*layers)
    net.classifier = torch.nn.Linear(width * 2 * 2, NUM_CLASSES)
    net.forward = lambda x: net.classifier(net.features(x).flatten(1))
    net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state_dict.items()})
    return net.double().eval()


def test_pytorch_teacher_gives_sre2l_loss_and_gradient():
    """A PyTorch state_dict imported as a teacher: loss and image gradient equal SRe2L's code
    path (forward hooks on every BatchNorm2d's input, torch.norm, CrossEntropyLoss)."""
    import torch

    model, variables = _bn_net()
    state_dict = models.to_torch_state_dict(variables, model)
    net = _torch_convnet_bn(4, 2, state_dict)
    dataset = data.load_dataset(DATA)
    imported = teacher.import_torch_teacher(
        {k: torch.tensor(v) for k, v in state_dict.items()},
        model_name="ConvNetBN",
        model_overrides={"width": 4, "depth": 2},
        dataset=dataset,
        key_style="mtt",
    )
    images, labels = _images(seed=3), np.array([1, 3, 0, 2])

    features = []  # SRe2L's BNFeatureHook: statistics of input[0] of every BatchNorm2d
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):

            def hook(module, inputs, output):
                x = inputs[0]
                channels = x.shape[1]
                mean = x.mean([0, 2, 3])
                var = x.permute(1, 0, 2, 3).reshape(channels, -1).var(1, unbiased=False)
                features.append(
                    torch.norm(module.running_var - var, 2)
                    + torch.norm(module.running_mean - mean, 2)
                )

            module.register_forward_hook(hook)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float64)).requires_grad_(True)
    ce = torch.nn.CrossEntropyLoss()(net(x), torch.from_numpy(labels))
    rescale = [10.0] + [1.0] * (len(features) - 1)
    loss_torch = ce + 0.01 * sum(f * r for f, r in zip(features, rescale, strict=True))
    loss_torch.backward()

    def objective(images):
        return recover_step.recover_loss(
            imported.model, imported.variables, images, labels, r_bn=0.01
        )

    value_and_grad = jax.value_and_grad(objective, has_aux=True)
    (loss, _), grad = jax.jit(value_and_grad, compiler_options=FAST_COMPILE)(jnp.asarray(images))
    np.testing.assert_allclose(loss, loss_torch.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, x.grad.numpy().transpose(0, 2, 3, 1), rtol=2e-4, atol=1e-6)


def test_gradient_matches_central_finite_differences_in_float64():
    with jax.enable_x64(True):
        model, variables = _bn_net()
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        images = jnp.asarray(_images(seed=5), jnp.float64)
        labels = jnp.array([3, 2, 1, 0])

        def loss(images):
            return recover_step.recover_loss(model, variables, images, labels, r_bn=0.3)[0]

        value_and_grad = jax.jit(jax.value_and_grad(loss))
        loss_jit = jax.jit(loss)
        value, grad = value_and_grad(images)
        assert value.dtype == jnp.float64 and grad.dtype == jnp.float64
        rng = np.random.default_rng(7)
        for _ in range(3):
            direction = jnp.asarray(rng.normal(size=images.shape))
            eps = 1e-6
            fd = (loss_jit(images + eps * direction) - loss_jit(images - eps * direction)) / (
                2 * eps
            )
            np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(fd), rtol=1e-6)
    assert jnp.ones(()).dtype == jnp.float32  # x64 is off again


def test_bn_layers_are_in_module_order_with_the_stem_first():
    resnet = models.get_model("ResNet18BN", NUM_CLASSES, IMAGE_SHAPE, width=2)
    names = recover_step.bn_layer_names(
        resnet, models.variable_shapes(resnet, IMAGE_SHAPE), IMAGE_SHAPE
    )
    assert len(names) == 20 and names[0] == "bn1"  # ResNet-18 has 20 BN layers; stem first
    assert names[1:3] == ["layer1_0/bn1", "layer1_0/bn2"]
    assert names[5:8] == ["layer2_0/bn1", "layer2_0/bn2", "layer2_0/shortcut_norm"]
    deep = models.get_model("ConvNetBN", NUM_CLASSES, (8, 8, 1), width=2, depth=11, pool="none")
    names = recover_step.bn_layer_names(deep, models.variable_shapes(deep, (8, 8, 1)), (8, 8, 1))
    assert names == [f"norm_{d}" for d in range(11)]  # not sorted as strings (norm_10 < norm_2)


def test_first_bn_multiplier_weights_the_first_layer_and_r_bn_scales_the_sum():
    model, variables = _bn_net(4, 3)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(images, r_bn, multiplier):
        return recover_step.recover_loss(
            model, variables, images, jnp.arange(4), r_bn=r_bn, first_bn_multiplier=multiplier
        )

    images = jnp.asarray(_images(seed=1))
    loss_10, parts_10 = run(images, 0.5, 10.0)
    loss_1, parts_1 = run(images, 0.5, 1.0)
    loss_0, parts_0 = run(images, 0.0, 10.0)
    layers = np.asarray(parts_1["bn_layers"], np.float64)
    np.testing.assert_allclose(parts_1["bn"], layers.sum(), rtol=1e-6)
    np.testing.assert_allclose(parts_10["bn"] - parts_1["bn"], 9 * layers[0], rtol=1e-5)
    np.testing.assert_allclose(loss_10 - loss_1, 0.5 * 9 * layers[0], rtol=1e-5)
    np.testing.assert_allclose(loss_10 - loss_0, 0.5 * parts_10["bn"], rtol=1e-5)
    np.testing.assert_allclose(loss_0, parts_0["ce"], rtol=1e-7)
    # The first term is that of the first conv's output (= the first BN's input) by hand.
    params = variables["params"]["conv_0"]
    conv = np.asarray(_numpy_conv(np.asarray(images, np.float64), params["kernel"], params["bias"]))
    running = variables["batch_stats"]["norm_0"]
    by_hand = np.linalg.norm(conv.var(axis=(0, 1, 2)) - running["var"]) + np.linalg.norm(
        conv.mean(axis=(0, 1, 2)) - running["mean"]
    )
    np.testing.assert_allclose(layers[0], by_hand, rtol=1e-5)


def test_teacher_without_batchnorm_is_refused():
    model = models.get_model("ConvNet", NUM_CLASSES, IMAGE_SHAPE, width=4, depth=1)
    variables = models.init_variables(model, _init_key(0), IMAGE_SHAPE)
    with pytest.raises(DDJaxError, match="no BatchNorm"):
        recover_step.recover_loss(
            model, variables, jnp.zeros((2, *IMAGE_SHAPE)), jnp.arange(2), r_bn=1
        )
    with pytest.raises(DDJaxError, match="no BatchNorm"):
        recover_step.bn_layer_names(model, variables, IMAGE_SHAPE)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def test_multi_crop_is_shared_by_the_batch_and_cifar_only_rolls():
    image = _images(n=1, seed=2)
    batch = jnp.asarray(np.repeat(image, 3, axis=0))
    shared = jax.jit(
        lambda images, key: recover_step.multi_crop(images, key, SETTINGS),
        compiler_options=FAST_COMPILE,
    )
    for seed in range(4):
        out = np.asarray(shared(batch, jax.random.key(seed)))
        np.testing.assert_array_equal(out[0], out[1])
        np.testing.assert_array_equal(out[0], out[2])
    cifar = recover_step.RecoverSettings(
        iterations=1, lr=0.1, r_bn=0.01, mean=MEAN, std=STD, crop=False, flip=False, jitter=(0, 4)
    )
    rolled = jax.jit(
        lambda images, key: recover_step.multi_crop(images, key, cifar),
        compiler_options=FAST_COMPILE,
    )
    seen = set()
    for seed in range(40):
        out = np.asarray(rolled(batch, jax.random.key(seed)))[0]
        match = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(out, np.roll(image[0], (dy, dx), axis=(0, 1)))
        ]
        assert match, "not a roll by offsets in 0..4"
        seen.add(match[0])
    assert len(seen) > 10  # both offsets vary over the inclusive range


def test_step_is_cosine_adam_then_clip():
    """Two steps equal: gradient of the loss on the same augmented batch, torch.optim.Adam
    (betas 0.5/0.9, eps 1e-8) with the lr set to 0.5(1+cos(πt/T))·lr, per-channel clamp."""
    import torch  # torch is a test-only dependency; the device subprocess does not need it

    model, variables = _bn_net()
    labels = jnp.array([0, 1, 2, 3])
    step = recover_step.make_recover_step(
        model, SETTINGS, donate=False, compiler_options=FAST_COMPILE
    )
    state = recover_step.init_state(jax.random.key(4), 4, IMAGE_SHAPE)
    images = torch.from_numpy(np.asarray(state.images)).requires_grad_(True)
    adam = torch.optim.Adam([images], lr=SETTINGS.lr, betas=(0.5, 0.9), eps=1e-8)
    lower, upper = SETTINGS.pixel_bounds()

    def objective(x, augment_key):
        augmented = recover_step.multi_crop(x, augment_key, SETTINGS)
        return recover_step.recover_loss(model, variables, augmented, labels, r_bn=SETTINGS.r_bn)

    reference = jax.jit(jax.value_and_grad(objective, has_aux=True), compiler_options=FAST_COMPILE)
    key = state.key
    for t in range(2):
        new_state, metrics = step(state, variables, labels)
        key, augment_key = jax.random.split(key)
        (loss, _), grad = reference(jnp.asarray(images.detach().numpy()), augment_key)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
        lr_t = 0.5 * (1 + math.cos(math.pi * t / SETTINGS.iterations)) * SETTINGS.lr
        np.testing.assert_allclose(metrics["lr"], lr_t, rtol=1e-6)
        for group in adam.param_groups:
            group["lr"] = lr_t
        images.grad = torch.from_numpy(np.asarray(grad))
        adam.step()
        with torch.no_grad():
            images.copy_(
                torch.maximum(torch.minimum(images, torch.tensor(upper)), torch.tensor(lower))
            )
        np.testing.assert_allclose(new_state.images, images.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(jax.random.key_data(new_state.key), jax.random.key_data(key))
        assert int(new_state.step) == t + 1
        state = new_state


def test_step_traces_once_and_clipping_keeps_valid_pixels():
    model, variables = _bn_net()
    loud = recover_step.RecoverSettings(**{**SETTINGS.__dict__, "lr": 50.0, "iterations": 5})
    step = recover_step.make_recover_step(model, loud, compiler_options=FAST_COMPILE)
    lower, upper = loud.pixel_bounds()
    for seed, labels in ((0, [0, 1, 2, 3]), (1, [3, 3, 1, 0])):
        images, metrics = recover_step.recover_batch(
            step, variables, np.array(labels), jax.random.key(seed), loud, IMAGE_SHAPE
        )
        assert np.all(images >= lower - 1e-6) and np.all(images <= upper + 1e-6)
        assert np.any(np.isclose(images, lower)) and np.any(np.isclose(images, upper))
        assert np.isfinite(metrics["loss"])
    assert step._cache_size() == 1  # 10 iterations over two batches: one compiled program
    np.testing.assert_allclose(lower, (0 - np.array(MEAN)) / np.array(STD), rtol=1e-6)
    np.testing.assert_allclose(upper, (1 - np.array(MEAN)) / np.array(STD), rtol=1e-6)


def _sharded_batch(tmp_path=None):
    """One batch of 8 recovered over all devices (data axis when there are several)."""
    model, variables = _bn_net(4, 2)
    if jax.config.jax_enable_x64:  # the teacher in float64: the whole recovery runs in float64
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    settings = recover_step.RecoverSettings(**{**SETTINGS.__dict__, "iterations": 3})
    sharding = recover_step.batch_sharding_for(8)
    assert (sharding is None) == (jax.device_count() == 1)
    step = recover_step.make_recover_step(
        model, settings, batch_sharding=sharding, compiler_options=FAST_COMPILE
    )
    images, metrics = recover_step.recover_batch(
        step,
        variables,
        np.arange(8) % NUM_CLASSES,
        jax.random.key(11),
        settings,
        IMAGE_SHAPE,
        batch_sharding=sharding,
    )
    if tmp_path is not None:
        np.save(tmp_path / "images.npy", images)
        np.save(tmp_path / "loss.npy", np.array([metrics["loss"], metrics["bn"]]))
    return images, np.array([metrics["loss"], metrics["bn"]])


def test_eight_devices_give_the_same_images_and_loss_as_one(tmp_path):
    """The batch split over 8 forced host devices: BN statistics stay whole-batch ones.

    Both runs are float64: three Adam steps turn float32 reordering (~1e-7) into pixel
    differences of ~1e-5 that depend on the CPU's vector width (AVX2 vs AVX-512), while in
    float64 reordering stays ~1e-15, so a 1e-9 tolerance still catches any real difference
    (e.g. per-device instead of whole-batch BN statistics, which differ by ~1e-1).
    """
    script = textwrap.dedent(
        f"""
        import sys, pathlib
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jax, test_recover
        assert jax.device_count() == 8
        with jax.enable_x64(True):
            test_recover._sharded_batch(pathlib.Path({str(tmp_path)!r}))
        """
    )
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, timeout=300, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with jax.enable_x64(True):
        images, losses = _sharded_batch()  # this process has one device
    assert images.dtype == np.float64
    np.testing.assert_allclose(np.load(tmp_path / "loss.npy"), losses, rtol=1e-9)
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), images, rtol=0, atol=1e-9)


def test_a_batch_resumed_from_its_checkpoint_ends_bit_identical():
    """The checkpoint holds all that the remaining iterations depend on (images, Adam's
    moments, the step of the cosine rate, the augmentation key): resuming it from host
    arrays gives exactly the uninterrupted batch's images and last metrics."""
    model, variables = _bn_net()
    settings = recover_step.RecoverSettings(**{**SETTINGS.__dict__, "iterations": 5})
    step = recover_step.make_recover_step(model, settings, compiler_options=FAST_COMPILE)
    labels, key = np.array([0, 1, 2, 3]), jax.random.key(6)
    run = functools.partial(
        recover_step.recover_batch, step, variables, labels, key, settings, IMAGE_SHAPE
    )
    saved = {}
    images, metrics = run(
        checkpoint_every=2,
        on_checkpoint=lambda iteration, state: saved.setdefault(iteration, state),
    )
    assert sorted(saved) == [2, 4]  # none after the last iteration
    names = ["images", "key", "opt_state/count", "opt_state/mu", "opt_state/nu"]
    names += ["skips/streak", "skips/total", "step"]  # the guard's counters (ddjax.guard)
    assert sorted(saved[2]) == names
    assert int(saved[2]["step"]) == 2
    logged = []
    resumed, resumed_metrics = run(
        start_state=saved[2], log_every=1, on_log=lambda iteration, _: logged.append(iteration)
    )
    assert logged == [3, 4, 5]
    np.testing.assert_array_equal(resumed, images)
    np.testing.assert_array_equal(resumed_metrics["loss"], metrics["loss"])
    other_batch = {**saved[2], "images": saved[2]["images"][:2]}
    with pytest.raises(DDJaxError, match="checkpoint array 'images'"):
        run(start_state=other_batch)


# --------------------------------------------------------------------------------------------
# Batches and output
# --------------------------------------------------------------------------------------------


def test_batches_follow_sre2l_order_or_are_class_wise():
    batches = recover_step.plan_batches(num_classes=5, ipc=2, batch_size=2)
    assert [b.classes.tolist() for b in batches] == [[0, 1], [2, 3], [4]] * 2
    assert [b.ipc_ids.tolist() for b in batches] == [[0, 0], [0, 0], [0], [1, 1], [1, 1], [1]]
    for batch in batches:  # distinct classes, one image each
        assert len(set(batch.classes.tolist())) == len(batch.classes)
    wise = recover_step.plan_batches(num_classes=2, ipc=5, batch_size=2, batching="class_wise")
    assert [b.classes.tolist() for b in wise] == [[0, 0], [0, 0], [0], [1, 1], [1, 1], [1]]
    assert [b.ipc_ids.tolist() for b in wise] == [[0, 1], [2, 3], [4]] * 2
    for plan in (batches, wise):
        pairs = {(int(c), int(i)) for b in plan for c, i in zip(*b, strict=True)}
        assert len(pairs) == sum(len(b.classes) for b in plan) == 10


def test_jpeg_round_trip_floors_to_uint8_like_sre2l():
    """Constant colours survive JPEG exactly, so the result shows the floor (not rounding)."""
    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
    pixels = np.array([128.9, 64.2, 200.99], np.float32) / 255  # floor -> 128, 64, 200
    images = np.broadcast_to((pixels - mean) / std, (2, 16, 16, 3)).astype(np.float32)
    out = recover_step.jpeg_round_trip(images, MEAN, STD, quality=75)
    np.testing.assert_allclose(
        out * std + mean, np.broadcast_to([128, 64, 200], out.shape) / 255, atol=1e-6
    )
    grey = recover_step.jpeg_round_trip(np.zeros((1, 8, 8, 1), np.float32), (0.5,), (0.25,))
    np.testing.assert_allclose(grey * 0.25 + 0.5, 127 / 255, atol=1e-6)  # floor(127.5) = 127


# --------------------------------------------------------------------------------------------
# The run: teacher on disk -> batches -> synthetic set, resume, refusals
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    model, variables = _bn_net(8, 2)
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    teacher.save_teacher(
        path,
        model_name="ConvNetBN",
        model_overrides={"width": 8, "depth": 2},
        variables=variables,
        dataset=data.load_dataset(DATA),
    )
    return path


def _run_config(teacher_path, **overrides):
    config = import_config("recover/sre2l.py").recover_fields(
        DATA,
        ipc=2,
        batch_size=2,
        iterations=3,
        lr=0.25,
        r_bn=0.01,
        jitter=(0, 2),
        crop=True,
        flip=True,
        crop_scale=(0.3, 1.0),
    )
    config.teacher = str(teacher_path)
    config.log_every = 2
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def test_killed_run_resumes_to_the_same_synthetic_set(teacher_dir, tmp_path):
    import json

    from ddjax.synset import load_synset

    config = _run_config(teacher_dir)
    whole = recover.run_recover(config, str(tmp_path / "whole"), compiler_options=FAST_COMPILE)
    killed = tmp_path / "killed"
    assert (
        recover.run_recover(config, str(killed), compiler_options=FAST_COMPILE, _stop_after=1)
        is None
    )
    assert sorted(p.name for p in (killed / "batches").iterdir()) == ["batch_00000.npz"]
    assert not (killed / "synset.npz").exists()
    # A kill while writing batch 1 leaves only a temporary file, which resume ignores; a kill
    # before results.json was rewritten loses nothing either (batch 0's numbers are in its file).
    (killed / "batches" / "batch_00001.npz.tmp.npz").write_bytes(b"half")
    (killed / "results.json").unlink()
    resumed = recover.run_recover(config, str(killed), compiler_options=FAST_COMPILE)

    np.testing.assert_array_equal(resumed.images, whole.images)
    saved = load_synset(killed / "synset.npz")
    np.testing.assert_array_equal(saved.images, whole.images)
    np.testing.assert_array_equal(saved.labels, np.repeat(np.arange(4), 2))
    assert saved.meta["method"] == "sre2l" and saved.meta["teacher"] == str(teacher_dir)
    assert (killed / "synset.png").exists()
    # JPEG q75 round trip: pixels are multiples of 1/255 after de-normalisation.
    dataset = data.load_dataset(DATA)
    codes = (saved.images * np.array(dataset.std) + np.array(dataset.mean)) * 255
    np.testing.assert_allclose(codes, np.round(codes), atol=2e-3)
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert {"loss", "ce", "bn", "lr"} <= steps[0].keys() and steps[0]["iteration"] == 2
    results = json.loads((killed / "results.json").read_text())
    assert sorted(results["batches"]) == ["0", "1", "2", "3"]
    assert list(results["batches"]["0"]["bn_layers"]) == ["norm_0", "norm_1"]


def test_folder_output_holds_the_npz_runs_images_as_jpeg_or_png_files(teacher_dir, tmp_path):
    """output='folder': one file per image, CCC/III.jpg, written batch by batch; the same
    images (same seed) as output='npz' after SRe2L's JPEG round trip, or their uint8 codes
    exactly as PNG; an ImageNet-layout folder that ddjax's folder reader labels by class."""
    import json

    from PIL import Image

    from ddjax.data.sources.folder import list_folder
    from ddjax.synfolder import open_synfolder, to_codes

    run = functools.partial(recover.run_recover, compiler_options=FAST_COMPILE)
    floats = run(_run_config(teacher_dir, jpeg_quality=0), str(tmp_path / "npz")).images
    dataset = data.load_dataset(DATA)
    returned = run(_run_config(teacher_dir, output="folder"), str(tmp_path / "jpeg"))
    root = tmp_path / "jpeg" / "synset"
    assert returned.root == root
    names = [f"{c:03d}/{i:03d}.jpg" for c in range(NUM_CLASSES) for i in range(2)]
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg")) == names
    assert not (tmp_path / "jpeg" / "batches").exists()
    assert not (tmp_path / "jpeg" / "synset.npz").exists()
    assert (tmp_path / "jpeg" / "synset.png").exists()
    folder = open_synfolder(root)
    np.testing.assert_array_equal(folder.labels, np.repeat(np.arange(NUM_CLASSES), 2))
    np.testing.assert_array_equal(
        folder.all_images(), recover_step.jpeg_round_trip(floats, dataset.mean, dataset.std, 75)
    )
    summary = json.loads((tmp_path / "jpeg" / "results.json").read_text())["summary"]
    assert summary["synset"] == str(root) and summary["num_images"] == 2 * NUM_CLASSES
    assert summary["bytes"] == sum(p.stat().st_size for p in root.rglob("*.jpg"))
    listing = list_folder(str(root))
    files = listing.train.paths() + listing.test.paths()
    labels = np.concatenate([listing.train.labels, listing.test.labels])
    assert len(files) == 2 * NUM_CLASSES
    assert [int(p.parent.name) for p in files] == labels.tolist()

    run(_run_config(teacher_dir, output="folder", jpeg_quality=0), str(tmp_path / "png"))
    png = open_synfolder(tmp_path / "png" / "synset")
    assert png.image_format == "png" and all(f.endswith(".png") for f in png.files)
    codes = np.stack([np.asarray(Image.open(png.root / f)) for f in png.files])
    np.testing.assert_array_equal(codes, to_codes(floats, dataset.mean, dataset.std))


CHECKPOINTED = {"output": "folder", "iterations": 5, "checkpoint_every": 2, "log_every": 1}


@pytest.fixture(scope="module")
def folder_whole(teacher_dir, tmp_path_factory):
    """An uninterrupted folder run with in-batch checkpoints (4 batches of 5 iterations)."""
    workdir = tmp_path_factory.mktemp("whole") / "run"
    config = _run_config(teacher_dir, **CHECKPOINTED)
    recover.run_recover(config, str(workdir), compiler_options=FAST_COMPILE)
    return workdir


def _file_bytes(workdir):
    root = workdir / "synset"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def _step_events(workdir):
    import json

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["batch"], r["iteration"]) for r in records if r["event"] == "step"]


def test_run_killed_inside_a_batch_resumes_at_its_last_checkpoint(
    teacher_dir, folder_whole, tmp_path, monkeypatch
):
    import json

    config = _run_config(teacher_dir, **CHECKPOINTED)
    killed = tmp_path / "killed"
    # Batch 0 whole (5 iterations), then 3 of batch 1: its checkpoint is at iteration 2.
    stopped = recover.run_recover(
        config, str(killed), compiler_options=FAST_COMPILE, _stop_after_iterations=8
    )
    assert stopped is None
    with np.load(killed / "inflight.npz") as inflight:
        assert int(inflight["batch"]) == 1 and int(inflight["state/step"]) == 2
    assert sorted(p.name for p in (killed / "synset" / ".done").iterdir()) == ["batch_00000.json"]

    calls = []

    def counting(*args, **kwargs):
        step = recover_step.make_recover_step(*args, **kwargs)
        return lambda *a: calls.append(1) or step(*a)

    monkeypatch.setattr(recover, "make_recover_step", counting)
    recover.run_recover(config, str(killed), compiler_options=FAST_COMPILE)
    assert len(calls) == 3 + 5 + 5  # batch 1 from iteration 3, then batches 2 and 3
    assert _file_bytes(killed) == _file_bytes(folder_whole)
    assert not (killed / "inflight.npz").exists()
    events = _step_events(killed)
    assert sorted(events) == sorted(_step_events(folder_whole))  # each once, none missing
    assert len(set(events)) == len(events) == 4 * 5
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    checkpoints = [(r["batch"], r["iteration"]) for r in records if r["event"] == "checkpoint"]
    assert checkpoints == [(b, i) for b in range(4) for i in (2, 4)]  # each once
    assert [r["batch"] for r in records if r["event"] == "batch"] == [0, 1, 2, 3]


def test_batch_killed_between_its_files_and_its_record_is_redone(
    teacher_dir, folder_whole, tmp_path
):
    """The record is written after the images: without it the batch is redone, whatever
    files it left; a finished batch's losses come back from its record when results.json
    is lost."""
    import json

    config = _run_config(teacher_dir, **CHECKPOINTED)
    killed = tmp_path / "killed"
    recover.run_recover(config, str(killed), compiler_options=FAST_COMPILE, _stop_after=2)
    root = killed / "synset"
    # Batch 1 (classes 2, 3 of ipc 0): one file renamed into place, one left as a temporary.
    (root / ".done" / "batch_00001.json").unlink()
    (root / "003" / "000.jpg").rename(root / "003" / "000.jpg.tmp")
    (killed / "results.json").unlink()
    recover.run_recover(config, str(killed), compiler_options=FAST_COMPILE)

    assert _file_bytes(killed) == _file_bytes(folder_whole)
    events = _step_events(killed)
    assert len(set(events)) == len(events) == 4 * 5
    batches = json.loads((killed / "results.json").read_text())["batches"]
    expected = json.loads((folder_whole / "results.json").read_text())["batches"]
    assert sorted(batches) == ["0", "1", "2", "3"]
    for index in batches:
        assert batches[index]["loss"] == expected[index]["loss"]
        assert batches[index]["bn_layers"] == expected[index]["bn_layers"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ipc": 0}, "config.ipc=0"),
        ({"batch_size": 5}, "config.batch_size=5 exceeds the 4 classes"),
        ({"batching": "class_wise", "batch_size": 3}, "exceeds ipc=2"),
        ({"batching": "shuffled"}, "config.batching='shuffled'"),
        ({"iterations": 0}, "config.iterations=0"),
        ({"lr": 0.0}, "config.lr=0.0"),
        ({"r_bn": -1.0}, "config.r_bn=-1.0"),
        ({"jitter": (3, 1)}, "config.jitter=(3, 1)"),
        ({"jitter": (0, 8)}, "rolls by up to 8 px"),
        ({"crop_scale": (0.5, 1.5)}, "config.crop_scale"),
        ({"jpeg_quality": 100}, "config.jpeg_quality=100"),
        ({"output": "zip"}, "config.output='zip'"),
        ({"checkpoint_every": -1}, "config.checkpoint_every=-1"),
        ({"teacher": ""}, "config.teacher is empty"),
        ({"teacher": "/nonexistent/teacher"}, "not a ddjax teacher"),
        ({"dataset.name": "synthetic:classes=5,size=8,channels=3,train=20,test=5"}, "dataset="),
        ({"dataset.zca": True}, "zca"),
    ],
)
def test_bad_configs_are_refused_before_any_work(teacher_dir, tmp_path, overrides, message):
    config = _run_config(teacher_dir, **overrides)
    with pytest.raises(DDJaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recover.run_recover(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_teacher_without_batchnorm_is_refused_by_the_run(tmp_path):
    dataset = data.load_dataset(DATA)
    model = models.get_model("ConvNet", NUM_CLASSES, IMAGE_SHAPE, width=4, depth=1)
    path = tmp_path / "no_bn"
    teacher.save_teacher(
        path,
        model_name="ConvNet",
        model_overrides={"width": 4, "depth": 1},
        variables=models.init_variables(model, _init_key(0), IMAGE_SHAPE),
        dataset=dataset,
    )
    with pytest.raises(DDJaxError, match="no BatchNorm layers"):
        recover.run_recover(_run_config(path), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_config_files_hold_the_published_settings():
    published = {
        # dataset: (ipc, batch, lr, iterations, r_bn, crop, flip, jitter)
        "imagenet": (50, 100, 0.25, 4000, 0.01, True, True, (0, 32)),
        "tiny_imagenet": (50, 100, 0.1, 4000, 1.0, True, True, (-4, 4)),
        "cifar100": (50, 100, 0.25, 1000, 0.01, False, False, (0, 4)),
    }
    for name in ("imagenet", "tiny_imagenet", "cifar100", "cifar10", "fashion_mnist", "digits"):
        config = load_config(f"configs/recover/sre2l.py:{name}")
        assert config.first_bn_multiplier == 10.0 and config.teacher == ""
        # ImageNet-scale rows: JPEG files batch by batch, a kill loses at most 500 iterations.
        large = name in ("imagenet", "tiny_imagenet")
        assert config.output == ("folder" if large else "npz")
        assert config.checkpoint_every == (500 if large else 0)
        assert tuple(config.crop_scale) == (0.08, 1.0)
        if name in published:
            got = (config.ipc, config.batch_size, config.lr, config.iterations, config.r_bn)
            got += (config.crop, config.flip, tuple(config.jitter))
            assert got == published[name], name
            assert config.jpeg_quality == 75
        channels = 1 if name in ("fashion_mnist", "digits") else 3
        settings = recover_step.RecoverSettings(
            iterations=config.iterations,
            lr=config.lr,
            r_bn=config.r_bn,
            first_bn_multiplier=config.first_bn_multiplier,
            crop=config.crop,
            crop_scale=tuple(config.crop_scale),
            flip=config.flip,
            jitter=tuple(config.jitter),
            mean=(0.5,) * channels,
            std=(0.25,) * channels,
        )
        size = {"imagenet": 224, "tiny_imagenet": 64, "fashion_mnist": 28, "digits": 8}.get(
            name, 32
        )
        settings.validate((size, size, channels))
