"""ResNet-18 in MTT's four forms and as SRe2L's small-image torchvision teacher; ResNet-50/101.

Promise: :class:`ResNet18`, whose fields select MTT's ``ResNet18``/``ResNet18BN``, the ``_AP``
variants (average-pool downsampling) and the ImageNet stem; and :class:`BottleneckResNet`,
torchvision's ``resnet50``/``resnet101`` (He et al., CVPR 2016, with the stride on the 3×3 conv
as in torchvision's "v1.5"), with the same stem choice. Their Flax module names (``conv1``,
``bn1``, ``layer{s}_{b}`` with ``conv{i}``/``bn{i}``/``shortcut_conv``/``shortcut_norm``,
``classifier``) are what :mod:`ddjax.models.torch_io` maps to MTT's and torchvision's
state_dict keys.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddjax.models import layers
from ddjax.models.conv import CONV_GRADS


def _stem(x: jax.Array, model: ResNet18 | BottleneckResNet, norm: str, train: bool) -> jax.Array:
    """conv1 → bn1 → ReLU (→ max-pool): the small-image stem or torchvision's ImageNet stem.

    Small-image stem: 3×3 stride 1, no max-pool (MTT; SRe2L's CIFAR/Tiny-ImageNet teachers,
    ``conv1 = Conv2d(3, 64, 3, 1, 1)``, ``maxpool = Identity``). ImageNet stem: 7×7 stride 2,
    padding 3, then a 3×3 stride-2 max-pool with padding 1. Called inside the model's compact
    ``__call__``, so the layers are the model's own ``conv1`` and ``bn1``.
    """
    kernel, stride, padding = (3, 1, 1) if model.small_stem else (7, 2, 3)
    x = layers.conv2d(
        x,
        model.width,
        kernel,
        stride=stride,
        padding=padding,
        use_bias=False,
        init=model.conv_init,
        conv_grad=model.conv_grad,
        name="conv1",
    )
    x = nn.relu(layers.norm_layer(x, norm, train=train, name="bn1"))
    if not model.small_stem:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return x


class _BasicBlock(nn.Module):
    """ResNet BasicBlock: MTT's ``BasicBlock``, or ``BasicBlock_AP`` with ``avgpool_downsample``."""

    planes: int
    stride: int
    norm: str
    avgpool_downsample: bool
    conv_init: str
    conv_grad: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_planes = x.shape[-1]
        # The _AP variant replaces each stride-2 conv by a stride-1 conv and a 2×2 average pool.
        conv_stride = 1 if self.avgpool_downsample else self.stride
        downsample = self.avgpool_downsample and self.stride != 1
        conv_options = dict(use_bias=False, init=self.conv_init, conv_grad=self.conv_grad)

        out = layers.conv2d(
            x, self.planes, 3, stride=conv_stride, padding=1, name="conv1", **conv_options
        )
        out = nn.relu(layers.norm_layer(out, self.norm, train=train, name="bn1"))
        if downsample:
            out = layers.avg_pool(out)
        out = layers.conv2d(out, self.planes, 3, padding=1, name="conv2", **conv_options)
        out = layers.norm_layer(out, self.norm, train=train, name="bn2")

        shortcut = x
        if self.stride != 1 or in_planes != self.planes:
            shortcut = layers.conv2d(
                x, self.planes, 1, stride=conv_stride, name="shortcut_conv", **conv_options
            )
            if self.avgpool_downsample:
                shortcut = layers.avg_pool(shortcut)
            shortcut = layers.norm_layer(shortcut, self.norm, train=train, name="shortcut_norm")
        return nn.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock [2, 2, 2, 2], widths 64-128-256-512): one class for four networks.

    * ``ResNet18`` / ``ResNet18BN`` (MTT): ``small_stem=True`` — 3×3 stride-1 conv, norm, ReLU,
      no max-pool. MTT ends with ``F.avg_pool2d(out, 4)``; here the head pools globally, which
      is the same on the 4×4 maps of 28/32-px inputs and makes 64-px inputs work (MTT's version
      would hand a 2×2×512 map to a 512-input linear layer and fail).
    * ``ResNet18_AP`` / ``ResNet18BN_AP`` (MTT): ``avgpool_downsample=True`` — stride-2 convs
      become stride-1 convs followed by 2×2 average pooling, and the head *flattens* the final
      map in (C, H, W) order (512·4·4 features at 32 px, 512·3·3 at 28 px, as in MTT).
    * SRe2L's squeezed teacher for CIFAR/Tiny-ImageNet: torchvision's ``resnet18`` with
      ``conv1 = Conv2d(3, 64, 3, 1, 1)`` and no max-pool is exactly ``ResNet18BN`` (global
      average pool included). Use ``conv_init='torchvision'`` for torchvision's
      initialisation and ``key_style='torchvision'`` when converting its state_dict.
    * ``small_stem=False`` gives the ImageNet stem (7×7 stride-2 conv, norm, ReLU, 3×3 stride-2
      max-pool), i.e. MTT's ``ResNet18ImageNet`` and plain torchvision ``resnet18``.

    Attributes:
        num_classes: outputs of the linear head.
        norm: ``'batch'`` or ``'instance'`` (PyTorch ``GroupNorm(C, C)``, MTT's default).
        small_stem: 3×3/1 stem without max-pool (True) or the 7×7/2 ImageNet stem (False).
        avgpool_downsample: MTT's ``_AP`` variant.
        width: channels of the stem and first stage (64 in every published model; smaller
            values are for tests).
        conv_init: ``'pytorch'`` (default U(±1/√fan_in), as MTT) or ``'torchvision'``
            (kaiming-normal, fan-out, as torchvision's ResNet and hence SRe2L).
        conv_grad: CPU convolution gradient, ``'fast'`` (ddjax's) or ``'xla'`` (:data:`CONV_GRADS`).
    """

    num_classes: int
    norm: str = "batch"
    small_stem: bool = True
    avgpool_downsample: bool = False
    width: int = 64
    conv_init: str = "pytorch"
    conv_grad: str = "fast"

    def __post_init__(self) -> None:
        layers.check_positive_int("ResNet18", "num_classes", self.num_classes)
        layers.check_positive_int("ResNet18", "width", self.width)
        layers.check_choice("ResNet18", "norm", self.norm, ("batch", "instance"))
        layers.check_choice("ResNet18", "small_stem", self.small_stem, (True, False))
        layers.check_choice(
            "ResNet18", "avgpool_downsample", self.avgpool_downsample, (True, False)
        )
        layers.check_choice("ResNet18", "conv_init", self.conv_init, ("pytorch", "torchvision"))
        layers.check_choice("ResNet18", "conv_grad", self.conv_grad, CONV_GRADS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes) or features (N, F)."""
        x = _stem(x, self, self.norm, train)
        for stage in range(4):
            for block in range(2):
                x = _BasicBlock(
                    planes=self.width * 2**stage,
                    stride=2 if stage > 0 and block == 0 else 1,
                    norm=self.norm,
                    avgpool_downsample=self.avgpool_downsample,
                    conv_init=self.conv_init,
                    conv_grad=self.conv_grad,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
        features = layers.flatten_chw(x) if self.avgpool_downsample else jnp.mean(x, axis=(1, 2))
        if features_only:
            return features
        return layers.dense(features, self.num_classes, name="classifier")


#: Bottleneck blocks per stage of torchvision's ``resnet50`` and ``resnet101``.
BOTTLENECK_DEPTHS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

#: Output channels of a bottleneck block per channel of its 3×3 conv.
BOTTLENECK_EXPANSION = 4


class _Bottleneck(nn.Module):
    """torchvision's ``Bottleneck``: 1×1 → 3×3 (carries the stride) → 1×1 × expansion, + shortcut.

    The shortcut is a 1×1 conv with the block's stride and BatchNorm wherever the shape changes
    (every stage's first block, including stage 1, whose input has 1/4 of the output channels).
    """

    planes: int
    stride: int
    conv_init: str
    conv_grad: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_planes = self.planes * BOTTLENECK_EXPANSION
        conv_options = dict(use_bias=False, init=self.conv_init, conv_grad=self.conv_grad)
        out = x
        for index, (planes, kernel, stride) in enumerate(
            [(self.planes, 1, 1), (self.planes, 3, self.stride), (out_planes, 1, 1)], start=1
        ):
            out = layers.conv2d(
                out,
                planes,
                kernel,
                stride=stride,
                padding=kernel // 2,
                name=f"conv{index}",
                **conv_options,
            )
            out = layers.norm_layer(out, "batch", train=train, name=f"bn{index}")
            if index < 3:  # the last BatchNorm feeds the sum; ReLU comes after it
                out = nn.relu(out)

        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_planes:
            shortcut = layers.conv2d(
                x, out_planes, 1, stride=self.stride, name="shortcut_conv", **conv_options
            )
            shortcut = layers.norm_layer(shortcut, "batch", train=train, name="shortcut_norm")
        return nn.relu(out + shortcut)


class BottleneckResNet(nn.Module):
    """torchvision's ResNet-50 / ResNet-101: bottleneck blocks, widths 64-128-256-512 (× 4 out).

    ``depth=50`` is ``resnet50`` (blocks [3, 4, 6, 3], 25,557,032 parameters at 1000 classes),
    ``depth=101`` is ``resnet101`` ([3, 4, 23, 3], 44,549,160). BatchNorm throughout (PyTorch's
    momentum 0.1 and eps 1e-5), global average pooling, one linear head.

    * ``small_stem=False`` (the default: these networks exist only as torchvision's ImageNet
      models) is torchvision's 7×7 stride-2 stem with max-pool, registry names
      ``ResNet50BNImageNet`` / ``ResNet101BNImageNet``.
    * ``small_stem=True`` is the 3×3 stride-1 stem without max-pool that SRe2L and its
      successors put on torchvision's ResNet-50 for CIFAR-size inputs (``ResNet50BN`` /
      ``ResNet101BN``, named like ``ResNet18BN``). The state_dict keys are the same either way.

    Attributes:
        num_classes: outputs of the linear head.
        depth: 50 or 101 (:data:`BOTTLENECK_DEPTHS`).
        small_stem: 3×3/1 stem without max-pool (True) or the 7×7/2 ImageNet stem (False).
        width: channels of the stem and of the first stage's 3×3 convs (64 in the published
            models; smaller values are for tests).
        conv_init: ``'torchvision'`` (default; kaiming-normal fan-out convs, PyTorch's default
            for the head, BatchNorm γ = 1, β = 0) or ``'pytorch'`` (U(±1/√fan_in) convs).
        conv_grad: CPU convolution gradient, ``'fast'`` (ddjax's) or ``'xla'`` (:data:`CONV_GRADS`).
    """

    num_classes: int
    depth: int = 50
    small_stem: bool = False
    width: int = 64
    conv_init: str = "torchvision"
    conv_grad: str = "fast"

    def __post_init__(self) -> None:
        owner = "BottleneckResNet"
        layers.check_positive_int(owner, "num_classes", self.num_classes)
        layers.check_choice(owner, "depth", self.depth, tuple(BOTTLENECK_DEPTHS))
        layers.check_choice(owner, "small_stem", self.small_stem, (True, False))
        layers.check_positive_int(owner, "width", self.width)
        layers.check_choice(owner, "conv_init", self.conv_init, ("pytorch", "torchvision"))
        layers.check_choice(owner, "conv_grad", self.conv_grad, CONV_GRADS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes) or features (N, 4·8·width)."""
        x = _stem(x, self, "batch", train)
        for stage, num_blocks in enumerate(BOTTLENECK_DEPTHS[self.depth]):
            for block in range(num_blocks):
                x = _Bottleneck(
                    planes=self.width * 2**stage,
                    stride=2 if stage > 0 and block == 0 else 1,
                    conv_init=self.conv_init,
                    conv_grad=self.conv_grad,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
        features = jnp.mean(x, axis=(1, 2))
        if features_only:
            return features
        return layers.dense(features, self.num_classes, name="classifier")
