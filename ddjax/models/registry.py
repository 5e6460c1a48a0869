"""Model names, construction, initialisation and parameter counting.

Promises: :func:`get_model` builds any of :data:`MODEL_NAMES` (MTT's ``utils.get_network`` names,
plus ``ConvNetD<k>``/``ConvNetW<k>`` and torchvision's ResNet-50/101 and MobileNet-V2) and
rejects an unknown name, an unknown or invalid setting or images too small for the network
with a one-line :class:`~ddjax.errors.DDJaxError`; the CPU
convolution-gradient choice (``conv_grad``) is an explicit argument, decided where a stage
starts. :func:`init_variables` initialises as PyTorch would and returns plain dicts;
:func:`variable_shapes` does the same with ``jax.ShapeDtypeStruct`` leaves and allocates nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.errors import DDJaxError, check
from ddjax.models.convnet import ConvNet
from ddjax.models.mobilenet import MobileNetV2, inverted_residual_blocks
from ddjax.models.resnet import BottleneckResNet, ResNet18
from ddjax.models.vgg_alexnet import VGG11, VGG11_CFG, AlexNet

Variables = dict[str, Any]


_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "ConvNet": (ConvNet, {}),
    "ConvNetIN": (ConvNet, {"norm": "instance"}),
    "ConvNetBN": (ConvNet, {"norm": "batch"}),
    "ConvNetLN": (ConvNet, {"norm": "layer"}),
    "ConvNetGN": (ConvNet, {"norm": "group"}),
    "ConvNetNN": (ConvNet, {"norm": "none"}),
    "ConvNetAP": (ConvNet, {"pool": "avg"}),
    "ConvNetMP": (ConvNet, {"pool": "max"}),
    "ConvNetNP": (ConvNet, {"pool": "none"}),
    "ConvNetKIP": (ConvNet, {"width": 1024, "norm": "none"}),
    # SelMatch's BatchNorm ConvNet for Tiny-ImageNet.
    "ConvNetD4BN": (ConvNet, {"depth": 4, "norm": "batch"}),
    **{f"ConvNetD{d}": (ConvNet, {"depth": d}) for d in range(1, 9)},
    **{f"ConvNetW{w}": (ConvNet, {"width": w}) for w in (32, 64, 128, 256, 512, 1024)},
    "ResNet18": (ResNet18, {"norm": "instance"}),
    "ResNet18BN": (ResNet18, {"norm": "batch"}),
    "ResNet18_AP": (ResNet18, {"norm": "instance", "avgpool_downsample": True}),
    "ResNet18BN_AP": (ResNet18, {"norm": "batch", "avgpool_downsample": True}),
    "ResNet18ImageNet": (ResNet18, {"norm": "instance", "small_stem": False}),
    # torchvision's ImageNet networks (SRe2L's teachers and students). Named like ResNet18BN /
    # ResNet18ImageNet: "BN" for BatchNorm, "ImageNet" for the 7×7/2 stem with max-pool (no
    # suffix: the 3×3/1 small-image stem). Only BatchNorm exists for these, so "ResNet50ImageNet"
    # (instance norm, by analogy with ResNet18ImageNet) is deliberately not a name.
    "ResNet50BN": (BottleneckResNet, {"depth": 50, "small_stem": True}),
    "ResNet50BNImageNet": (BottleneckResNet, {"depth": 50, "small_stem": False}),
    "ResNet101BN": (BottleneckResNet, {"depth": 101, "small_stem": True}),
    "ResNet101BNImageNet": (BottleneckResNet, {"depth": 101, "small_stem": False}),
    "MobileNetV2": (MobileNetV2, {"small_stem": True}),
    "MobileNetV2ImageNet": (MobileNetV2, {"small_stem": False}),
    "VGG11": (VGG11, {"norm": "instance"}),
    "VGG11BN": (VGG11, {"norm": "batch"}),
    "AlexNet": (AlexNet, {}),
}

#: Names accepted by :func:`get_model` (MTT's names, and torchvision's ResNet-50/101 and
#: MobileNet-V2 in the same naming scheme). ``ConvNetD<k>`` and ``ConvNetW<k>`` are
#: also accepted for any positive k beyond the ones listed.
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

_PATTERNS = ((re.compile(r"ConvNetD(\d+)"), "depth"), (re.compile(r"ConvNetW(\d+)"), "width"))


def _lookup(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    if name in _REGISTRY:
        cls, defaults = _REGISTRY[name]
        return cls, dict(defaults)
    for pattern, field in _PATTERNS:
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) > 0:
            return ConvNet, {field: int(match.group(1))}
    raise DDJaxError(
        f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)} "
        "(and ConvNetD<k>, ConvNetW<k> for any positive k)"
    )


def get_model(
    name: str,
    num_classes: int,
    image_shape: tuple[int, int, int],
    *,
    conv_grad: str = "fast",
    **overrides: Any,
) -> nn.Module:
    """Builds a model by MTT's name, e.g. ``get_model('ConvNetD4', 200, (64, 64, 3))``.

    Args:
        name: one of :data:`MODEL_NAMES`, or ``ConvNetD<k>`` / ``ConvNetW<k>``.
        num_classes: outputs of the classifier.
        image_shape: (H, W, C) of the inputs; checked against the network's downsampling.
        conv_grad: how convolutions are differentiated on the CPU: ``'fast'`` (ddjax's
            :func:`conv_nhwc` gradient for stride-1 convolutions, 2-2.5x faster on XLA:CPU) or
            ``'xla'`` (XLA's own); the same values up to float rounding. Decided once, where a
            stage starts; on GPUs and TPUs both are XLA's. See :data:`CONV_GRADS`.
        **overrides: fields of the model class that replace the name's settings, e.g.
            ``width=32`` or ``norm='batch'``.

    Returns:
        The (unbound) Flax module.

    Raises:
        DDJaxError: unknown name, unknown or invalid field, or images too small for the model.
    """
    cls, settings = _lookup(name)
    explicit = ("parent", "name", "num_classes", "conv_grad")
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in explicit]
    for field in overrides:
        check(
            field in fields,
            f"{name} has no setting {field!r}; valid settings: {', '.join(fields)}",
        )
    settings.update(overrides)
    model = cls(num_classes=num_classes, conv_grad=conv_grad, **settings)
    _check_image_shape(model, image_shape)
    return model


def _feature_map_size(model: nn.Module, size: int, channels: int) -> int:
    """Side of the last feature map for an input side ``size``, following each layer's arithmetic.

    Convolution: out = in + 2·pad − k + 1 (stride 1) or ⌊(in + 2·pad − k)/2⌋ + 1 (stride 2);
    pooling floors, as in PyTorch.
    """
    if isinstance(model, ConvNet):
        for d in range(model.depth):
            size += 4 if channels == 1 and d == 0 else 0
            if model.pool != "none":
                size //= 2
        return size
    if isinstance(model, VGG11):
        size += 4 if channels == 1 else 0
        for _ in range(VGG11_CFG.count("M")):
            size //= 2
        return size
    if isinstance(model, AlexNet):
        size += 4 if channels == 1 else 0
        for _ in range(3):
            size //= 2
        return size
    if isinstance(model, ResNet18 | BottleneckResNet):
        if not model.small_stem:
            size = (size - 1) // 2 + 1  # 7×7 stride-2 conv, padding 3
            size = (size - 1) // 2 + 1  # 3×3 stride-2 max-pool, padding 1
        average = isinstance(model, ResNet18) and model.avgpool_downsample
        for _ in range(3):  # stages 2-4 downsample once each
            size = size // 2 if average else (size - 1) // 2 + 1
        return size
    if isinstance(model, MobileNetV2):
        # Every stride-2 layer is a 3×3 conv with padding 1; none can reach 0 from size ≥ 1.
        size = size if model.small_stem else (size - 1) // 2 + 1
        for block in inverted_residual_blocks(model.width_mult):
            size = (size - 1) // block.stride + 1
        return size
    raise DDJaxError(f"not a ddjax model: {type(model).__name__}")


def _check_image_shape(model: nn.Module, image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    ok = len(shape) == 3 and all(isinstance(s, int | np.integer) and s > 0 for s in shape)
    check(ok, f"image_shape must be (height, width, channels) of positive ints, got {image_shape}")
    height, width, channels = (int(s) for s in shape)
    final = [_feature_map_size(model, side, channels) for side in (height, width)]
    check(
        min(final) > 0,
        f"image_shape {shape} is too small for {type(model).__name__}: its downsampling "
        f"leaves a {final[0]}×{final[1]} feature map",
    )
    return height, width, channels


def _plain(tree: Any) -> Any:
    """Nested Mappings (e.g. FrozenDict) as plain dicts."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def init_variables(
    model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]
) -> Variables:
    """Initialises a model as PyTorch would (see the module docstring).

    Args:
        model: a ddjax model.
        key: PRNG key.
        image_shape: (H, W, C) of the inputs.

    Returns:
        ``{'params': ...}`` plus ``'batch_stats'`` for BatchNorm models, as plain dicts.

    Compile time: XLA:CPU compiles JAX's default threefry PRNG slowly, one draw per parameter
    tensor (≈25 s for ResNet-18 on a busy 2-core CPU; ≈4 s with ``jax.random.key(seed,
    impl='rbg')``). The key's implementation is the caller's choice; note that ``vmap`` over
    ``rbg`` keys does not give the same numbers as a Python loop over them, while threefry's does.
    """
    return _plain(_init(model, key, _check_image_shape(model, image_shape)))


# Jitted with the model as a static argument: equal models (same fields) share one compiled
# program, so initialising K evaluation networks in a loop compiles once. Flax modules are
# hashable dataclasses, which is what makes this cache work.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]) -> Any:
    return model.init({"params": key}, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def variable_shapes(model: nn.Module, image_shape: tuple[int, int, int]) -> Variables:
    """Like :func:`init_variables` but with ``jax.ShapeDtypeStruct`` leaves; allocates nothing."""
    shape = _check_image_shape(model, image_shape)
    images = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init({"params": jax.random.key(0)}, x, train=False), images
    )
    return _plain(variables)


def count_params(variables: Mapping[str, Any]) -> int:
    """Number of trainable scalars: the ``'params'`` collection (running statistics excluded).

    Accepts a variables dict (or a bare params tree) with array or ``ShapeDtypeStruct`` leaves,
    e.g. ``count_params(variable_shapes(model, (32, 32, 3)))``.
    """
    params = variables["params"] if "params" in variables else variables
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
