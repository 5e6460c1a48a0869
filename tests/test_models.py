"""Specifications of ddjax.models: MTT's networks, PyTorch init, layouts and equivalence.

The PyTorch comparisons re-state MTT's ConvNet, ResNet-18, VGG11 and AlexNet in a few lines of
PyTorch (written for these tests from the published architecture), load ddjax's converted
state_dict with ``strict=True`` and compare logits; they are skipped when torch is absent.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import models
from ddjax.errors import DDJaxError

# XLA:CPU compiles threefry draws slowly (one per parameter tensor); 'rbg' keys keep these
# tests fast and exercise the same code.
KEY = jax.random.key(0, impl="rbg")


def _images(shape: tuple[int, int, int], batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)


def _random_variables(model, shape: tuple[int, int, int], seed: int = 2) -> dict:
    """Random parameters and running statistics of the right shapes, without compiling an init.

    Random (not 1/0) norm affines and running statistics make γ/β or mean/var swaps visible.
    """
    template = models.variable_shapes(model, shape)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    rng = np.random.default_rng(seed)
    new = []
    for path, leaf in leaves:
        if path[-1].key in ("var", "scale"):
            new.append(rng.uniform(0.5, 1.5, leaf.shape))
        else:
            bound = 1.0 / math.sqrt(math.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.3
            new.append(rng.uniform(-bound, bound, leaf.shape))
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in new])


def _assert_trees_equal(a: dict, b: dict) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# Parameter counts and registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "num_classes", "image_shape", "expected"),
    [
        ("ConvNet", 10, (28, 28, 1), 317_706),  # Fashion-MNIST / MNIST
        ("ConvNet", 10, (32, 32, 3), 320_010),  # CIFAR-10
        ("ConvNet", 100, (32, 32, 3), 504_420),  # CIFAR-100
        ("ConvNetD4", 200, (64, 64, 3), 857_160),  # Tiny-ImageNet
        ("ConvNetD4", 1000, (64, 64, 3), 2_496_360),  # ImageNet-1K at 64 px (TESLA)
        ("ConvNetD5", 10, (128, 128, 3), 615_690),  # ImageNet subsets at 128 px
        ("ResNet18BN", 10, (32, 32, 3), 11_173_962),  # the usual CIFAR ResNet-18
    ],
)
def test_published_parameter_counts(name, num_classes, image_shape, expected):
    model = models.get_model(name, num_classes, image_shape)
    assert models.count_params(models.variable_shapes(model, image_shape)) == expected


def test_torchvision_resnet18_count_with_imagenet_stem():
    # torchvision.models.resnet18() has 11,689,512 parameters.
    model = models.get_model("ResNet18BN", 1000, (224, 224, 3), small_stem=False)
    assert models.count_params(models.variable_shapes(model, (224, 224, 3))) == 11_689_512


def test_registry_names_set_the_published_settings():
    assert models.get_model("ConvNetD4", 10, (64, 64, 3)).depth == 4
    assert models.get_model("ConvNetW64", 10, (32, 32, 3)).width == 64
    assert models.get_model("ConvNetW48", 10, (32, 32, 3)).width == 48  # any width
    assert models.get_model("ConvNetMP", 10, (32, 32, 3)).pool == "max"
    assert models.get_model("ConvNetBN", 10, (32, 32, 3)).norm == "batch"
    assert models.get_model("ResNet18", 10, (32, 32, 3)).norm == "instance"
    ap = models.get_model("ResNet18BN_AP", 10, (32, 32, 3))
    assert ap.norm == "batch" and ap.avgpool_downsample
    assert models.get_model("VGG11BN", 10, (32, 32, 3)).norm == "batch"
    for name in ("ConvNet", "ConvNetD4", "ConvNetD5", "ConvNetLN", "ConvNetGN", "ConvNetNN"):
        assert name in models.MODEL_NAMES
    for name in ("ConvNetNP", "ConvNetW64", "ResNet18_AP", "VGG11", "AlexNet"):
        assert name in models.MODEL_NAMES


# Small settings shared by the forward and PyTorch tests: narrow networks, 16-px images where
# they fit, batch 2. Sharing shapes lets eager dispatch reuse compiled ops across tests.
def _small(name: str) -> tuple[dict, tuple[int, int, int]]:
    if name.startswith("ConvNet"):
        depth = models.get_model(name, 2, (512, 512, 3)).depth
        return {"width": 8}, (max(16, 2**depth),) * 2 + (3,)
    if name.startswith("ResNet"):  # ResNet-18, -50, -101
        return {"width": 8}, (16, 16, 3) if "ImageNet" not in name else (32, 32, 3)
    if name.startswith("MobileNetV2"):  # no dropout: this test's train call passes no RNG
        return {"width_mult": 0.25, "dropout": 0.0}, (32, 32, 3)
    return {}, (28, 28, 1)  # VGG11, AlexNet: the grey 28-px path (first conv pads more)


# The ConvNetD<k>/W<k> families differ from 'ConvNet' only in one field (tested above).
FORWARD_NAMES = [n for n in models.MODEL_NAMES if n[len("ConvNet") :][:1] not in ("D", "W")]
FORWARD_NAMES = sorted({*FORWARD_NAMES, "ConvNetD4BN", "ConvNetD5"})


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_every_model_runs_forward(name):
    overrides, shape = _small(name)
    model = models.get_model(name, 5, shape, **overrides)
    variables = _random_variables(model, shape)
    images = jnp.asarray(_images(shape))

    logits = model.apply(variables, images)
    assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
    features = model.apply(variables, images, features_only=True)
    head = variables["params"]["fc" if name == "AlexNet" else "classifier"]
    assert features.shape == (2, head["kernel"].shape[0])
    np.testing.assert_allclose(
        features @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-5
    )

    # The same training call works for every model; only BatchNorm models return statistics.
    train_logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert train_logits.shape == (2, 5)
    has_bn = "BN" in name or name.startswith("MobileNetV2")
    assert ("batch_stats" in variables) == has_bn
    assert ("batch_stats" in updates) == has_bn
    if not has_bn:
        assert not updates
        np.testing.assert_allclose(train_logits, logits, rtol=1e-6, atol=1e-6)


def test_convnet_head_sees_2048_features_for_28px_grey_images():
    # MTT pads the first conv by 3 for one channel, so 28 px behaves as 32 px.
    model = models.get_model("ConvNet", 10, (28, 28, 1))
    shapes = models.variable_shapes(model, (28, 28, 1))
    assert shapes["params"]["classifier"]["kernel"].shape == (2048, 10)


# ---------------------------------------------------------------------------------------------
# BatchNorm behaviour
# ---------------------------------------------------------------------------------------------


def test_batchnorm_train_updates_running_stats_like_pytorch_and_eval_uses_them():
    overrides, shape = _small("ConvNetBN")
    model = models.get_model("ConvNetBN", 5, shape, **overrides)
    variables = _random_variables(model, shape)
    images = jnp.asarray(_images(shape))

    logits, updates = model.apply(
        variables, images, train=True, mutable=["batch_stats"], capture_intermediates=True
    )
    conv_out = updates["intermediates"]["conv_0"]["__call__"][0]
    count = conv_out.size // conv_out.shape[-1]
    batch_mean = conv_out.mean(axis=(0, 1, 2))
    unbiased_var = conv_out.var(axis=(0, 1, 2)) * count / (count - 1)
    old, new = variables["batch_stats"]["norm_0"], updates["batch_stats"]["norm_0"]
    # PyTorch: running = 0.9·running + 0.1·batch, with the unbiased batch variance.
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * batch_mean, rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * unbiased_var, rtol=1e-5)

    # Train mode normalises with batch statistics, so the running ones do not matter; without
    # `mutable` it runs and leaves them alone.
    shifted = {**variables, "batch_stats": _random_variables(model, shape, seed=5)["batch_stats"]}
    train_logits = model.apply(shifted, images, train=True)
    np.testing.assert_allclose(train_logits, logits, rtol=1e-5, atol=1e-5)
    # Eval mode uses the running statistics.
    eval_logits = model.apply(variables, images)
    assert not np.allclose(model.apply(shifted, images), eval_logits, atol=1e-3)
    assert not np.allclose(eval_logits, logits, atol=1e-3)


def test_bn_inputs_collection_records_batch_statistics_of_each_bn_input():
    overrides, shape = _small("ConvNetBN")
    model = models.get_model("ConvNetBN", 5, shape, **overrides)
    variables = _random_variables(model, shape)
    images = jnp.asarray(_images(shape))
    _, state = model.apply(
        variables, images, mutable=["bn_inputs", "intermediates"], capture_intermediates=True
    )
    for depth in range(3):
        conv_out = state["intermediates"][f"conv_{depth}"]["__call__"][0]
        recorded = state["bn_inputs"][f"norm_{depth}"]
        np.testing.assert_allclose(recorded["mean"], conv_out.mean(axis=(0, 1, 2)), rtol=1e-5)
        np.testing.assert_allclose(recorded["var"], conv_out.var(axis=(0, 1, 2)), rtol=1e-5)
    # Laid out like batch_stats; never part of initialised variables.
    structure = jax.tree_util.tree_structure(variables["batch_stats"])
    assert jax.tree_util.tree_structure(state["bn_inputs"]) == structure
    assert "bn_inputs" not in models.variable_shapes(model, shape)
    # ResNet-18 has 20 BatchNorm layers, as SRe2L counts.
    resnet = models.variable_shapes(models.get_model("ResNet18BN", 10, (32, 32, 3)), (32, 32, 3))
    assert len(jax.tree_util.tree_leaves(resnet["batch_stats"])) == 2 * 20


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def _check_pytorch_uniform_init(params: dict) -> int:
    """Asserts U(±1/√fan_in) for every kernel and its bias, γ = 1, β = 0; returns #checked."""
    checked = 0
    for name, module in params.items():
        if "kernel" not in module:
            if "scale" in module:  # normalisation layer
                np.testing.assert_array_equal(module["scale"], 1.0)
                np.testing.assert_array_equal(module["bias"], 0.0)
            else:
                checked += _check_pytorch_uniform_init(module)
            continue
        bound = 1.0 / math.sqrt(math.prod(module["kernel"].shape[:-1]))
        for leaf in module.values():
            leaf = np.asarray(leaf)
            assert np.abs(leaf).max() <= bound, name
            if leaf.size >= 1000:  # uniform on ±bound, not a tiny or a normal init
                assert np.abs(leaf).max() > 0.95 * bound, name
                np.testing.assert_allclose(leaf.std(), bound / math.sqrt(3), rtol=0.1)
            checked += 1
    return checked


def test_pytorch_default_initialisation():
    shape = (32, 32, 3)
    model = models.get_model("ConvNet", 10, shape)
    variables = models.init_variables(model, KEY, shape)
    assert isinstance(variables, dict) and isinstance(variables["params"], dict)
    assert list(variables) == ["params"]
    assert _check_pytorch_uniform_init(variables["params"]) == 8  # 3 convs + head, with biases
    # Another key gives other weights; the same key the same ones.
    again = models.init_variables(model, KEY, shape)
    other = models.init_variables(model, jax.random.key(1, impl="rbg"), shape)
    kernel = variables["params"]["conv_0"]["kernel"]
    np.testing.assert_array_equal(again["params"]["conv_0"]["kernel"], kernel)
    assert not np.allclose(other["params"]["conv_0"]["kernel"], kernel)


def test_torchvision_initialisation_for_resnet():
    # SRe2L's teacher is torchvision's resnet18: kaiming_normal_(mode='fan_out',
    # nonlinearity='relu') for convs (which have no bias), PyTorch's default for the head.
    shape = (8, 8, 3)
    model = models.get_model("ResNet18BN", 10, shape, width=8, conv_init="torchvision")
    variables = models.init_variables(model, KEY, shape)
    params = variables["params"]
    assert set(params["conv1"]) == set(params["layer2_0"]["shortcut_conv"]) == {"kernel"}
    for block in ("layer3_1", "layer4_0", "layer4_1"):
        kernel = np.asarray(params[block]["conv2"]["kernel"])
        fan_out = kernel.shape[3] * 9
        np.testing.assert_allclose(kernel.std(), math.sqrt(2.0 / fan_out), rtol=0.1)
    assert _check_pytorch_uniform_init({"classifier": params["classifier"]}) == 2
    np.testing.assert_array_equal(params["layer4_1"]["bn2"]["scale"], 1.0)
    np.testing.assert_array_equal(params["layer4_1"]["bn2"]["bias"], 0.0)
    stats = variables["batch_stats"]["layer2_0"]["shortcut_norm"]
    np.testing.assert_array_equal(stats["mean"], 0.0)
    np.testing.assert_array_equal(stats["var"], 1.0)


# ---------------------------------------------------------------------------------------------
# Layout conversion
# ---------------------------------------------------------------------------------------------


def test_convnet_state_dict_keys_are_mtts():
    model = models.get_model("ConvNetBN", 10, (32, 32, 3))
    state_dict = models.to_torch_state_dict(_random_variables(model, (32, 32, 3)), model)
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = []
    for index in (0, 4, 8):  # Sequential: conv, BN, ReLU, AvgPool per block
        expected += [f"features.{index}.weight", f"features.{index}.bias"]
        expected += [f"features.{index + 1}.{suffix}" for suffix in bn]
    expected += ["classifier.weight", "classifier.bias"]
    assert list(state_dict) == expected
    assert state_dict["features.0.weight"].shape == (128, 3, 3, 3)
    assert state_dict["classifier.weight"].shape == (10, 2048)
    assert state_dict["features.1.num_batches_tracked"].dtype == np.int64

    no_norm = models.get_model("ConvNetNN", 10, (32, 32, 3), width=8, pool="none")
    keys = list(models.to_torch_state_dict(_random_variables(no_norm, (8, 8, 3)), no_norm))
    assert keys[:4] == [
        "features.0.weight",
        "features.0.bias",
        "features.2.weight",
        "features.2.bias",
    ]


def test_resnet_key_styles():
    model = models.get_model("ResNet18BN", 10, (16, 16, 3), width=4)
    variables = _random_variables(model, (16, 16, 3))
    mtt = models.to_torch_state_dict(variables, model)
    assert "layer2.0.shortcut.0.weight" in mtt and "layer2.0.shortcut.1.running_var" in mtt
    assert "layer1.0.shortcut.0.weight" not in mtt and "classifier.weight" in mtt
    tv = models.to_torch_state_dict(variables, model, key_style="torchvision")
    assert "layer2.0.downsample.1.weight" in tv and "fc.bias" in tv
    back = models.from_torch_state_dict(tv, model, (16, 16, 3), key_style="torchvision")
    _assert_trees_equal(back, variables)

    ap = models.get_model("ResNet18BN_AP", 10, (16, 16, 3), width=4)
    ap_keys = models.to_torch_state_dict(_random_variables(ap, (16, 16, 3)), ap)
    assert "layer3.0.shortcut.2.running_mean" in ap_keys  # conv, AvgPool2d, norm


@pytest.mark.parametrize(
    ("name", "overrides", "shape"),
    [
        ("ConvNetBN", {"width": 8}, (16, 16, 3)),
        ("ConvNetLN", {"width": 8}, (28, 28, 1)),
        ("ConvNetGN", {"width": 8, "pool": "max"}, (16, 16, 3)),
        ("ResNet18BN_AP", {"width": 4}, (16, 16, 3)),
        ("ResNet18ImageNet", {"width": 4}, (32, 32, 3)),
        ("VGG11BN", {}, (32, 32, 1)),
        ("AlexNet", {}, (16, 16, 3)),
    ],
)
def test_state_dict_and_flat_vector_round_trips(name, overrides, shape):
    model = models.get_model(name, 7, shape, **overrides)
    _assert_round_trips(model, _random_variables(model, shape), shape)


def _assert_round_trips(model, variables: dict, shape: tuple[int, int, int]) -> None:
    """state_dict and flat-vector round trips; the vector is the state_dict's parameters."""
    state_dict = models.to_torch_state_dict(variables, model)
    _assert_trees_equal(models.from_torch_state_dict(state_dict, model, shape), variables)

    vector = models.to_flat_vector(variables, model)
    assert vector.shape == (models.count_params(variables),) and vector.dtype == np.float32
    back = models.from_flat_vector(vector, model, shape)
    _assert_trees_equal(back["params"], variables["params"])
    if "batch_stats" in variables:  # a fresh PyTorch module's buffers, as MTT's student has
        for stats in jax.tree_util.tree_leaves(back["batch_stats"]):
            assert set(np.unique(np.asarray(stats))) <= {0.0, 1.0}
    # Parameter order is PyTorch's: the vector is the state_dict's parameters concatenated.
    params_only = [
        v.reshape(-1)
        for k, v in state_dict.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    np.testing.assert_array_equal(vector, np.concatenate(params_only))


def test_bad_state_dicts_and_vectors_give_clear_errors():
    shape = (16, 16, 3)
    model = models.get_model("ConvNetBN", 10, shape, width=8)
    state_dict = models.to_torch_state_dict(_random_variables(model, shape), model)

    wrong_shape = {**state_dict, "features.4.weight": np.zeros((8, 8, 5, 5), np.float32)}
    with pytest.raises(DDJaxError, match=r"features\.4\.weight.*\(8, 8, 5, 5\).*\(8, 8, 3, 3\)"):
        models.from_torch_state_dict(wrong_shape, model, shape)
    missing = {k: v for k, v in state_dict.items() if k != "features.1.running_var"}
    with pytest.raises(DDJaxError, match=r"missing keys: features\.1\.running_var"):
        models.from_torch_state_dict(missing, model, shape)
    extra = {**state_dict, "features.2.weight": np.zeros(3, np.float32)}
    with pytest.raises(DDJaxError, match=r"unexpected keys: features\.2\.weight"):
        models.from_torch_state_dict(extra, model, shape)
    # Another image size changes the head: the error says which shape was expected.
    with pytest.raises(DDJaxError, match=r"classifier\.weight.*\(10, 32\).*\(10, 128\)"):
        models.from_torch_state_dict(state_dict, model, (32, 32, 3))
    # DataParallel's 'module.' prefix is accepted.
    wrapped = {f"module.{k}": v for k, v in state_dict.items()}
    models.from_torch_state_dict(wrapped, model, shape)

    vector = models.to_flat_vector(_random_variables(model, shape), model)
    with pytest.raises(
        DDJaxError, match=rf"shape \({vector.size - 1},\), expected \({vector.size},\)"
    ):
        models.from_flat_vector(vector[:-1], model, shape)
    with pytest.raises(DDJaxError, match="torchvision"):
        models.to_torch_state_dict({}, model, key_style="torchvision")
    with pytest.raises(DDJaxError, match="params"):
        models.to_torch_state_dict({"params": {}}, model)


def test_invalid_names_and_settings_give_clear_errors():
    with pytest.raises(DDJaxError, match=r"unknown model 'ConvNot'.*ConvNetBN.*ResNet18BN_AP"):
        models.get_model("ConvNot", 10, (32, 32, 3))
    with pytest.raises(DDJaxError, match=r"ConvNet\.norm.*'batch'.*got 'bogus'"):
        models.get_model("ConvNet", 10, (32, 32, 3), norm="bogus")
    with pytest.raises(DDJaxError, match=r"ConvNet\.pool"):
        models.ConvNet(num_classes=10, pool="mean")
    with pytest.raises(DDJaxError, match=r"ConvNet\.width must be a positive integer, got 0"):
        models.get_model("ConvNet", 10, (32, 32, 3), width=0)
    with pytest.raises(DDJaxError, match=r"ConvNet\.width must be a multiple of 4"):
        models.get_model("ConvNetGN", 10, (32, 32, 3), width=6)
    with pytest.raises(DDJaxError, match=r"ResNet18\.norm"):
        models.get_model("ResNet18", 10, (32, 32, 3), norm="layer")
    with pytest.raises(DDJaxError, match=r"ConvNet\.conv_grad must be one of \['fast', 'xla'\]"):
        models.get_model("ConvNet", 10, (32, 32, 3), conv_grad="cudnn")
    with pytest.raises(DDJaxError, match=r"ResNet18\.conv_grad"):
        models.ResNet18(num_classes=10, conv_grad=None)
    with pytest.raises(DDJaxError, match=r"VGG11 has no setting 'width'"):
        models.get_model("VGG11", 10, (32, 32, 3), width=8)
    with pytest.raises(DDJaxError, match=r"too small for ConvNet.*0×0"):
        models.get_model("ConvNetD6", 10, (32, 32, 3))
    with pytest.raises(DDJaxError, match=r"image_shape"):
        models.init_variables(models.ConvNet(num_classes=10), KEY, (32, 32))


# ---------------------------------------------------------------------------------------------
# Equivalence with PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_nets():
    """Minimal PyTorch re-statements of MTT's networks (same module names and order)."""
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    F = torch.nn.functional

    def norm_layer(kind, channels, shape=None):
        if kind == "batch":
            return tnn.BatchNorm2d(channels)
        if kind == "layer":
            return tnn.LayerNorm(shape)
        return tnn.GroupNorm(channels if kind == "instance" else 4, channels)

    class ConvNet(tnn.Module):
        def __init__(self, channel, num_classes, width, depth, norm, pool, im_size):
            super().__init__()
            layers, c, size = [], channel, im_size + (4 if channel == 1 else 0)
            for d in range(depth):
                layers.append(tnn.Conv2d(c, width, 3, padding=3 if channel == 1 and d == 0 else 1))
                if norm != "none":
                    layers.append(norm_layer(norm, width, [width, size, size]))
                layers.append(tnn.ReLU())
                if pool != "none":
                    layers.append(tnn.AvgPool2d(2, 2) if pool == "avg" else tnn.MaxPool2d(2, 2))
                    size //= 2
                c = width
            self.features = tnn.Sequential(*layers)
            self.classifier = tnn.Linear(width * size * size, num_classes)

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1))

    class BasicBlock(tnn.Module):
        def __init__(self, in_planes, planes, stride, norm, ap):
            super().__init__()
            self.stride, self.ap = stride, ap
            conv_stride = 1 if ap else stride
            self.conv1 = tnn.Conv2d(in_planes, planes, 3, conv_stride, 1, bias=False)
            self.bn1 = norm_layer(norm, planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = norm_layer(norm, planes)
            self.shortcut = tnn.Sequential()
            if stride != 1 or in_planes != planes:
                parts = [tnn.Conv2d(in_planes, planes, 1, conv_stride, bias=False)]
                parts += [tnn.AvgPool2d(2, 2)] if ap else []
                self.shortcut = tnn.Sequential(*parts, norm_layer(norm, planes))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            if self.ap and self.stride != 1:
                out = F.avg_pool2d(out, 2, 2)
            out = self.bn2(self.conv2(out))
            return F.relu(out + self.shortcut(x))

    class ResNet18(tnn.Module):
        def __init__(self, channel, num_classes, width, norm, ap):
            super().__init__()
            self.ap = ap
            self.conv1 = tnn.Conv2d(channel, width, 3, 1, 1, bias=False)
            self.bn1 = norm_layer(norm, width)
            in_planes = width
            for stage in range(4):
                planes = width * 2**stage
                blocks = []
                for stride in (1 if stage == 0 else 2, 1):
                    blocks.append(BasicBlock(in_planes, planes, stride, norm, ap))
                    in_planes = planes
                setattr(self, f"layer{stage + 1}", tnn.Sequential(*blocks))
            self.classifier = tnn.LazyLinear(num_classes)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            for stage in range(1, 5):
                out = getattr(self, f"layer{stage}")(out)
            if not self.ap:
                out = F.avg_pool2d(out, out.shape[-1])  # MTT: avg_pool2d(out, 4) at 32 px
            return self.classifier(out.flatten(1))

    class VGG11(tnn.Module):
        def __init__(self, channel, num_classes):
            super().__init__()
            layers, c = [], channel
            for index, entry in enumerate(models._VGG11_CFG):
                if entry == "M":
                    layers.append(tnn.MaxPool2d(2, 2))
                    continue
                pad = 3 if channel == 1 and index == 0 else 1
                layers += [tnn.Conv2d(c, entry, 3, padding=pad), tnn.GroupNorm(entry, entry)]
                layers.append(tnn.ReLU())
                c = entry
            layers.append(tnn.AvgPool2d(1, 1))
            self.features = tnn.Sequential(*layers)
            self.classifier = tnn.Linear(512, num_classes)

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1))

    class AlexNet(tnn.Module):
        def __init__(self, channel, num_classes):
            super().__init__()
            self.features = tnn.Sequential(
                tnn.Conv2d(channel, 128, 5, padding=4 if channel == 1 else 2),
                tnn.ReLU(),
                tnn.MaxPool2d(2, 2),
                tnn.Conv2d(128, 192, 5, padding=2),
                tnn.ReLU(),
                tnn.MaxPool2d(2, 2),
                tnn.Conv2d(192, 256, 3, padding=1),
                tnn.ReLU(),
                tnn.Conv2d(256, 192, 3, padding=1),
                tnn.ReLU(),
                tnn.Conv2d(192, 192, 3, padding=1),
                tnn.ReLU(),
                tnn.MaxPool2d(2, 2),
            )
            self.fc = tnn.Linear(192 * 4 * 4, num_classes)

        def forward(self, x):
            return self.fc(self.features(x).flatten(1))

    return torch, {"ConvNet": ConvNet, "ResNet18": ResNet18, "VGG11": VGG11, "AlexNet": AlexNet}


def _load(torch, net, state_dict, example):
    with torch.no_grad():
        net(example)  # materialise LazyLinear before loading
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
    net.load_state_dict(tensors, strict=True)
    return net


def _compare(torch, net, model, variables, shape, *, train=False, seed=1):
    images = _images(shape, seed=seed)
    example = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    _load(torch, net, models.to_torch_state_dict(variables, model), example)
    net.train(train)
    with torch.no_grad():
        expected = net(example).numpy()
    if train:
        logits, updates = model.apply(
            variables, jnp.asarray(images), train=True, mutable=["batch_stats"]
        )
    else:
        logits, updates = model.apply(variables, jnp.asarray(images)), {}
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4 * scale)
    # Parameters come back in named_parameters order: MTT's flat vector.
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    np.testing.assert_array_equal(models.to_flat_vector(variables, model), flat)
    return net, updates


@pytest.mark.parametrize(
    ("norm", "pool", "shape"),
    [
        ("instance", "avg", (28, 28, 1)),  # MTT's Fashion-MNIST ConvNet: padding 3 → 32 px
        ("batch", "avg", (16, 16, 3)),  # ConvNetBN, eval mode with random running stats
        ("layer", "avg", (16, 16, 3)),
        ("group", "max", (16, 16, 3)),
        ("none", "none", (8, 8, 3)),
    ],
)
def test_convnet_matches_pytorch(torch_nets, norm, pool, shape):
    torch, nets = torch_nets
    model = models.ConvNet(num_classes=5, width=8, depth=3, norm=norm, pool=pool)
    variables = _random_variables(model, shape)
    net = nets["ConvNet"](shape[2], 5, 8, 3, norm, pool, shape[0])
    _compare(torch, net, model, variables, shape)


def test_convnet_bn_train_mode_matches_pytorch(torch_nets):
    torch, nets = torch_nets
    overrides, shape = _small("ConvNetBN")
    model = models.get_model("ConvNetBN", 5, shape, **overrides)
    variables = _random_variables(model, shape)
    net = nets["ConvNet"](3, 5, 8, 3, "batch", "avg", 16)
    net, updates = _compare(torch, net, model, variables, shape, train=True)
    # Running statistics after one step agree too (unbiased variance, momentum 0.1).
    state_dict = models.to_torch_state_dict({**variables, **updates}, model)
    for key, value in net.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(state_dict[key], value.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("norm", "ap", "width", "shape"),
    [
        ("batch", False, 8, (16, 16, 3)),  # ResNet18BN, eval mode with random running stats
        ("instance", True, 8, (16, 16, 3)),  # ResNet18_AP
        ("batch", False, 8, (28, 28, 1)),  # odd map sizes: 28 → 14 → 7 → 4
    ],
)
def test_resnet18_matches_pytorch(torch_nets, norm, ap, width, shape):
    torch, nets = torch_nets
    model = models.ResNet18(num_classes=5, norm=norm, avgpool_downsample=ap, width=width)
    variables = _random_variables(model, shape)
    net = nets["ResNet18"](shape[2], 5, width, norm, ap)
    _compare(torch, net, model, variables, shape)


def test_vgg11_and_alexnet_match_pytorch_on_grey_28px(torch_nets):
    torch, nets = torch_nets
    shape = (28, 28, 1)
    for name in ("VGG11", "AlexNet"):
        model = models.get_model(name, 5, shape)
        _compare(torch, nets[name](1, 5), model, _random_variables(model, shape), shape)


def _xla_conv(x, kernel, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    ("kernel_size", "padding"),
    [
        (3, ((1, 1), (1, 1))),
        (3, ((3, 3), (3, 3))),  # MTT's padding of 1-channel images: more than k - 1
        (3, ((0, 2), (1, 0))),
        (1, ((0, 0), (0, 0))),
        (5, ((0, 0), (2, 2))),
    ],
)
def test_cpu_conv_gradients_equal_xlas_to_second_order(kernel_size, padding):
    """conv_nhwc's hand-written backward gives XLA's first and second derivatives (float64)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)))
        kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 3, 4)))
        np.testing.assert_array_equal(
            models.conv_nhwc(x, kernel, padding), _xla_conv(x, kernel, padding)
        )

        def first(conv):  # a scalar of the first derivatives, as trajectory matching needs
            def f(x, kernel):
                gx, gk = jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, padding))), (0, 1))(
                    x, kernel
                )
                return jnp.sum(gx**2) + jnp.sum(gk * jnp.cos(gk))

            return f

        for argnum in (0, 1):
            ours = jax.grad(first(models.conv_nhwc), argnum)(x, kernel)
            xla = jax.grad(first(_xla_conv), argnum)(x, kernel)
            np.testing.assert_allclose(ours, xla, rtol=1e-10, atol=1e-10)
    assert jnp.ones(()).dtype == jnp.float32  # x64 is off again


def test_models_use_the_fast_cpu_conv_gradient_only_where_it_applies():
    """Stride-1 convs go through conv_nhwc on CPU, ResNet's stride-2 convs do not,
    conv_grad='xla' switches it off, and the gradients agree either way."""
    shape = (16, 16, 3)
    model = models.ResNet18(num_classes=3, width=4, norm="batch")
    xla_model = models.ResNet18(num_classes=3, width=4, norm="batch", conv_grad="xla")
    variables = _random_variables(model, shape)
    x = jnp.asarray(_images(shape))

    def fast_convs(model):
        jaxpr = jax.make_jaxpr(lambda x: model.apply(variables, x))(x)
        return sum("custom_vjp" in eqn.primitive.name for eqn in jaxpr.eqns)

    def loss(model, params):
        logits, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits**2)

    # 14 stride-1 3x3 convs: the stem and 16 in the blocks, less the 3 with stride 2; none of
    # the 1x1 stride-2 shortcuts.
    assert fast_convs(model) == 14
    fast = jax.grad(functools.partial(loss, model))(variables["params"])
    assert fast_convs(xla_model) == 0
    slow = jax.grad(functools.partial(loss, xla_model))(variables["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), fast, slow)
