"""Specifications of ddjax.models' torchvision networks: ResNet-50/101 and MobileNet-V2.

Parameter counts are torchvision's, computed with ``jax.eval_shape`` (nothing allocated). The
PyTorch comparisons use torchvision_nets.py's re-statements of torchvision's ``resnet50``/
``resnet101``/``mobilenet_v2`` (same module names, written from the published architectures),
load ddjax's exported state_dict with ``strict=True`` (which proves the key layout) and compare
logits in eval and train mode. Where torchvision itself imports, the same comparisons run against
its models. The helpers (random variables, the PyTorch comparison) are test_models.py's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models import (
    KEY,
    _assert_round_trips,
    _assert_trees_equal,
    _compare,
    _images,
    _random_variables,
)

from ddjax import models
from ddjax.errors import DDJaxError

# ---------------------------------------------------------------------------------------------
# Parameter counts and registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # sum(p.numel() for p in torchvision.models.<net>().parameters())
        ("ResNet50BNImageNet", 25_557_032),
        ("ResNet101BNImageNet", 44_549_160),
        ("MobileNetV2ImageNet", 3_504_872),
        # Small-image stems: ResNet's 7×7 conv becomes 3×3 (64·3·(49 − 9) fewer weights);
        # MobileNet-V2's first conv only loses its stride.
        ("ResNet50BN", 25_557_032 - 64 * 3 * 40),
        ("ResNet101BN", 44_549_160 - 64 * 3 * 40),
        ("MobileNetV2", 3_504_872),
    ],
)
def test_torchvision_parameter_counts_at_1000_classes(name, expected):
    model = models.get_model(name, 1000, (224, 224, 3))
    assert models.count_params(models.variable_shapes(model, (224, 224, 3))) == expected


def test_registry_names_set_the_published_settings():
    for name, depth, small_stem in [
        ("ResNet50BN", 50, True),
        ("ResNet50BNImageNet", 50, False),
        ("ResNet101BN", 101, True),
        ("ResNet101BNImageNet", 101, False),
    ]:
        model = models.get_model(name, 10, (32, 32, 3))
        assert isinstance(model, models.BottleneckResNet)
        assert (model.depth, model.small_stem, model.width) == (depth, small_stem, 64)
        assert model.conv_init == "torchvision"
    for name, small_stem in [("MobileNetV2", True), ("MobileNetV2ImageNet", False)]:
        model = models.get_model(name, 10, (32, 32, 3))
        assert isinstance(model, models.MobileNetV2)
        assert (model.small_stem, model.width_mult, model.dropout) == (small_stem, 1.0, 0.2)
    # 53 BatchNorm layers in ResNet-50 (1 + 16·3 + 4 shortcuts), 52 in MobileNet-V2.
    for name, num_bn in [("ResNet50BNImageNet", 53), ("MobileNetV2ImageNet", 52)]:
        shapes = models.variable_shapes(models.get_model(name, 10, (64, 64, 3)), (64, 64, 3))
        assert len(jax.tree_util.tree_leaves(shapes["batch_stats"])) == 2 * num_bn


def test_bad_settings_give_clear_errors():
    with pytest.raises(DDJaxError, match=r"unknown model 'ResNet50ImageNet'.*ResNet50BNImageNet"):
        models.get_model("ResNet50ImageNet", 10, (32, 32, 3))
    with pytest.raises(DDJaxError, match=r"BottleneckResNet\.depth must be one of \[50, 101\]"):
        models.get_model("ResNet50BN", 10, (32, 32, 3), depth=34)
    with pytest.raises(DDJaxError, match=r"ResNet101BN has no setting 'norm'"):
        models.get_model("ResNet101BN", 10, (32, 32, 3), norm="instance")
    with pytest.raises(DDJaxError, match=r"BottleneckResNet\.width must be a positive integer"):
        models.get_model("ResNet50BN", 10, (32, 32, 3), width=0)
    with pytest.raises(DDJaxError, match=r"MobileNetV2\.width_mult must be a positive number"):
        models.get_model("MobileNetV2", 10, (32, 32, 3), width_mult=0)
    with pytest.raises(DDJaxError, match=r"MobileNetV2\.dropout must be a probability in \[0, 1\)"):
        models.get_model("MobileNetV2ImageNet", 10, (32, 32, 3), dropout=1.0)
    with pytest.raises(DDJaxError, match=r"MobileNetV2\.conv_init must be one of"):
        models.get_model("MobileNetV2", 10, (32, 32, 3), conv_init="kaiming")
    with pytest.raises(DDJaxError, match=r"MobileNetV2\.small_stem must be one of"):
        models.get_model("MobileNetV2", 10, (32, 32, 3), small_stem="yes")


# ---------------------------------------------------------------------------------------------
# Layout conversion
# ---------------------------------------------------------------------------------------------

# Small variants: reduced width, the two stems, batch 2.
SMALL = {
    "ResNet50BN": ({"width": 4}, (16, 16, 3)),
    "ResNet101BNImageNet": ({"width": 4}, (32, 32, 3)),
    "MobileNetV2": ({"width_mult": 0.25}, (16, 16, 3)),
    "MobileNetV2ImageNet": ({"width_mult": 0.25}, (32, 32, 3)),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_state_dict_and_flat_vector_round_trips(name):
    overrides, shape = SMALL[name]
    model = models.get_model(name, 7, shape, **overrides)
    variables = _random_variables(model, shape)
    state_dict = models.to_torch_state_dict(variables, model)
    # torchvision's keys are these networks' only keys: both styles give them.
    torchvision = models.to_torch_state_dict(variables, model, key_style="torchvision")
    assert list(torchvision) == list(state_dict)
    back = models.from_torch_state_dict(torchvision, model, shape, key_style="torchvision")
    _assert_trees_equal(back, variables)
    _assert_round_trips(model, variables, shape)  # key_style 'mtt', flat vector, their order


def test_resnet50_state_dict_keys_are_torchvisions():
    model = models.get_model("ResNet50BNImageNet", 10, (32, 32, 3), width=4)
    state_dict = models.to_torch_state_dict(_random_variables(model, (32, 32, 3)), model)
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    block = []
    for index in (1, 2, 3):
        block += [f"layer1.0.conv{index}.weight"] + [f"layer1.0.bn{index}.{s}" for s in bn]
    block += ["layer1.0.downsample.0.weight"] + [f"layer1.0.downsample.1.{s}" for s in bn]
    assert list(state_dict)[:6] == ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    assert list(state_dict)[6 : 6 + len(block)] == block
    assert list(state_dict)[-2:] == ["fc.weight", "fc.bias"]
    # 53 BatchNorm layers (5 entries each), 53 convs and fc's two tensors: torchvision's 320.
    assert len(state_dict) == 320
    assert "layer2.1.downsample.0.weight" not in state_dict
    assert state_dict["layer2.0.conv2.weight"].shape == (8, 8, 3, 3)  # the stride-2 3×3 conv
    assert state_dict["layer4.2.conv3.weight"].shape == (128, 32, 1, 1)
    assert state_dict["fc.weight"].shape == (10, 128)
    assert state_dict["bn1.num_batches_tracked"].dtype == np.int64


def test_mobilenet_v2_state_dict_keys_are_torchvisions():
    model = models.get_model("MobileNetV2ImageNet", 10, (32, 32, 3))
    state_dict = models.to_torch_state_dict(_random_variables(model, (32, 32, 3)), model)
    assert len(state_dict) == 314  # 52 convs, 52 BatchNorms × 5, 2 for the classifier
    shapes = {k: v.shape for k, v in state_dict.items()}
    assert shapes["features.0.0.weight"] == (32, 3, 3, 3)
    # Block 1 (t = 1): depthwise Conv2dNormActivation, projection conv, BatchNorm.
    assert shapes["features.1.conv.0.0.weight"] == (32, 1, 3, 3)
    assert shapes["features.1.conv.1.weight"] == (16, 32, 1, 1)
    assert shapes["features.1.conv.2.running_var"] == (16,)
    # Later blocks: expansion, depthwise, projection conv, BatchNorm.
    assert shapes["features.2.conv.0.0.weight"] == (96, 16, 1, 1)
    assert shapes["features.2.conv.1.0.weight"] == (96, 1, 3, 3)
    assert shapes["features.2.conv.2.weight"] == (24, 96, 1, 1)
    assert shapes["features.2.conv.3.weight"] == (24,)
    assert shapes["features.17.conv.2.weight"] == (320, 960, 1, 1)
    assert shapes["features.18.0.weight"] == (1280, 320, 1, 1)
    assert "features.18.1.num_batches_tracked" in state_dict
    assert list(state_dict)[-2:] == ["classifier.1.weight", "classifier.1.bias"]
    assert shapes["classifier.1.weight"] == (10, 1280)


def test_bad_state_dicts_give_clear_errors():
    shape = (16, 16, 3)
    resnet18 = models.get_model("ResNet18BN", 10, shape, width=4)
    resnet50 = models.get_model("ResNet50BN", 10, shape, width=4)
    resnet18_sd = models.to_torch_state_dict(
        _random_variables(resnet18, shape), resnet18, key_style="torchvision"
    )
    with pytest.raises(DDJaxError, match=r"BottleneckResNet is missing keys: layer1\.0\.conv3"):
        models.from_torch_state_dict(resnet18_sd, resnet50, shape)
    narrow = models.get_model("MobileNetV2", 10, shape, width_mult=0.25)
    state_dict = models.to_torch_state_dict(_random_variables(narrow, shape), narrow)
    with pytest.raises(
        DDJaxError, match=r"features\.0\.0\.weight.*\(8, 3, 3, 3\).*\(32, 3, 3, 3\)"
    ):
        models.from_torch_state_dict(state_dict, models.get_model("MobileNetV2", 10, shape), shape)


# ---------------------------------------------------------------------------------------------
# Initialisation and dropout
# ---------------------------------------------------------------------------------------------


def _assert_kaiming_fan_out(kernel) -> None:
    kernel = np.asarray(kernel)  # HWIO; fan_out = k·k·out, grouped or not
    fan_out = kernel.shape[0] * kernel.shape[1] * kernel.shape[3]
    np.testing.assert_allclose(kernel.std(), math.sqrt(2.0 / fan_out), rtol=0.1)


def test_torchvision_initialisation():
    shape = (16, 16, 3)
    resnet = models.get_model("ResNet50BN", 10, shape, width=8)
    params = models.init_variables(resnet, KEY, shape)["params"]
    for kernel in (params["layer3_0"]["conv2"]["kernel"], params["layer4_2"]["conv3"]["kernel"]):
        _assert_kaiming_fan_out(kernel)
    bound = 1.0 / math.sqrt(256)  # fc keeps nn.Linear's default U(±1/√in)
    head = np.asarray(params["classifier"]["kernel"])
    assert np.abs(head).max() <= bound and np.abs(head).max() > 0.9 * bound
    np.testing.assert_array_equal(params["layer4_2"]["bn3"]["scale"], 1.0)
    np.testing.assert_array_equal(params["layer4_2"]["bn3"]["bias"], 0.0)

    mobilenet = models.get_model("MobileNetV2", 10, shape, width_mult=0.5)
    params = models.init_variables(mobilenet, KEY, shape)["params"]
    assert params["block_16"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 480)
    _assert_kaiming_fan_out(params["block_16"]["depthwise_conv"]["kernel"])
    _assert_kaiming_fan_out(params["block_16"]["expand_conv"]["kernel"])
    assert set(params["block_16"]["expand_conv"]) == {"kernel"}  # bias-free convs
    # MobileNet-V2's classifier: normal(0, 0.01), zero bias.
    np.testing.assert_allclose(np.asarray(params["classifier"]["kernel"]).std(), 0.01, rtol=0.1)
    np.testing.assert_array_equal(params["classifier"]["bias"], 0.0)


def test_mobilenet_v2_dropout_in_train_mode():
    overrides, shape = SMALL["MobileNetV2"]
    model = models.get_model("MobileNetV2", 5, shape, **overrides)
    variables = _random_variables(model, shape)
    images = jnp.asarray(_images(shape))
    with pytest.raises(DDJaxError, match=r"dropout 0\.2 in train mode: pass rngs=\{'dropout'"):
        model.apply(variables, images, train=True, mutable=["batch_stats"])

    (logits, state) = model.apply(
        variables,
        images,
        train=True,
        rngs={"dropout": jax.random.key(3)},
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
    features = np.asarray(model.apply(variables, images, train=True, features_only=True))
    dropped = np.asarray(state["intermediates"]["dropout"]["__call__"][0])
    # Inverted dropout: each feature is zeroed or scaled by 1/(1 − p); about p are zeroed
    # (counted among the features ReLU6 left non-zero).
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], features[kept] / 0.8, rtol=1e-6)
    assert 0.15 < 1.0 - kept[features != 0].mean() < 0.25
    head = variables["params"]["classifier"]
    np.testing.assert_allclose(
        logits, dropped @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5
    )
    # dropout=0.0 makes train mode deterministic without an RNG (eval mode never drops: the
    # forward test in test_models.py checks features @ W + b = logits there).
    no_dropout = models.get_model("MobileNetV2", 5, shape, dropout=0.0, **overrides)
    plain, _ = no_dropout.apply(variables, images, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(
        plain, features @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Equivalence with PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_nets():
    """PyTorch re-statements of torchvision's resnet50/101 and mobilenet_v2 (same module names)."""
    torch = pytest.importorskip("torch")
    import torchvision_nets

    return torch, torchvision_nets


def _compare_both_modes(torch, make_net, model, shape) -> None:
    """Eval-mode and train-mode logits, running statistics after the train step, flat vector."""
    variables = _random_variables(model, shape)
    _compare(torch, make_net(), model, variables, shape)
    net, updates = _compare(torch, make_net(), model, variables, shape, train=True, seed=4)
    # One train step moves the running statistics the same way (momentum 0.1, unbiased var).
    state_dict = models.to_torch_state_dict({**variables, **updates}, model)
    for key, value in net.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(state_dict[key], value.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "width", "shape"),
    [
        ("ResNet50BNImageNet", 16, (64, 64, 3)),  # 64 → 16 after the stem → 2×2 at the end
        ("ResNet101BN", 8, (32, 32, 3)),  # small stem: 32 → 4×4 at the end
    ],
)
def test_bottleneck_resnet_matches_pytorch(torch_nets, name, width, shape):
    torch, nets = torch_nets
    model = models.get_model(name, 5, shape, width=width)
    _compare_both_modes(
        torch,
        lambda: nets.ResNet(model.depth, 5, width=width, small_stem=model.small_stem),
        model,
        shape,
    )


@pytest.mark.parametrize(
    ("name", "shape"), [("MobileNetV2ImageNet", (64, 64, 3)), ("MobileNetV2", (32, 32, 3))]
)
def test_mobilenet_v2_matches_pytorch(torch_nets, name, shape):
    torch, nets = torch_nets
    # Full width (1.0). Dropout off in both, so that train mode compares BatchNorm's batch
    # statistics deterministically; dropout itself is specified above.
    model = models.get_model(name, 5, shape, dropout=0.0)
    _compare_both_modes(torch, lambda: nets.MobileNetV2(5, model.small_stem, 0.0), model, shape)


def _torchvision_nets():
    """(ddjax name, overrides, builder, compare logits?) for torchvision's own networks.

    Logits are compared for the two architectures; the variants (ResNet-101's block counts, the
    small-image stems, MobileNet-V2's channel rounding at ``width_mult=0.5``) are checked by
    parameter count, keys and shapes, their forward passes being those of the PyTorch tests above.
    """
    torchvision = pytest.importorskip("torchvision")
    tnn = pytest.importorskip("torch").nn
    tv = torchvision.models

    def small_resnet50(num_classes):  # SRe2L's CIFAR-size change
        net = tv.resnet50(num_classes=num_classes)
        net.conv1, net.maxpool = tnn.Conv2d(3, 64, 3, 1, 1, bias=False), tnn.Identity()
        return net

    def small_mobilenet(num_classes):
        net = tv.mobilenet_v2(num_classes=num_classes, dropout=0.0)
        net.features[0][0] = tnn.Conv2d(3, 32, 3, 1, 1, bias=False)
        return net

    no_dropout = {"dropout": 0.0}
    return [
        ("ResNet50BNImageNet", {}, lambda n: tv.resnet50(num_classes=n), True),
        ("ResNet101BNImageNet", {}, lambda n: tv.resnet101(num_classes=n), False),
        ("ResNet50BN", {}, small_resnet50, False),
        (
            "MobileNetV2ImageNet",
            no_dropout,
            lambda n: tv.mobilenet_v2(num_classes=n, dropout=0.0),
            True,
        ),
        (
            "MobileNetV2ImageNet",
            {**no_dropout, "width_mult": 0.5},
            lambda n: tv.mobilenet_v2(num_classes=n, dropout=0.0, width_mult=0.5),
            False,
        ),
        ("MobileNetV2", no_dropout, small_mobilenet, False),
    ]


def test_matches_real_torchvision_where_it_imports():
    """Counts, keys in order, shapes and logits against torchvision.models (skipped without it)."""
    torch = pytest.importorskip("torch")
    for name, overrides, build, compare_logits in _torchvision_nets():
        model = models.get_model(name, 1000, (224, 224, 3), **overrides)
        count = models.count_params(models.variable_shapes(model, (224, 224, 3)))
        assert count == sum(p.numel() for p in build(1000).parameters()), name

        shape = (64, 64, 3) if "ImageNet" in name else (32, 32, 3)
        model = models.get_model(name, 5, shape, **overrides)
        state_dict = models.to_torch_state_dict(_random_variables(model, shape), model)
        expected = {key: tuple(value.shape) for key, value in build(5).state_dict().items()}
        assert {key: value.shape for key, value in state_dict.items()} == expected, name
        assert list(state_dict) == list(expected), name
        if compare_logits:
            _compare_both_modes(torch, lambda build=build: build(5), model, shape)
