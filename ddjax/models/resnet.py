"""ResNet-18 in MTT's four forms and as SRe2L's small-image torchvision teacher.

Promise: one class, :class:`ResNet18`, whose fields select MTT's ``ResNet18``/``ResNet18BN``,
the ``_AP`` variants (average-pool downsampling) and the ImageNet stem; its Flax module names
(``conv1``, ``bn1``, ``layer{s}_{b}``, ``classifier``) are what :mod:`ddjax.models.torch_io` maps
to MTT's and torchvision's state_dict keys.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddjax.models import layers
from ddjax.models.conv import CONV_GRADS


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
        # Small-image stem: 3×3 stride 1 (MTT, SRe2L); ImageNet stem: 7×7 stride 2 + max-pool.
        kernel, stride, padding = (3, 1, 1) if self.small_stem else (7, 2, 3)
        x = layers.conv2d(
            x,
            self.width,
            kernel,
            stride=stride,
            padding=padding,
            use_bias=False,
            init=self.conv_init,
            conv_grad=self.conv_grad,
            name="conv1",
        )
        x = nn.relu(layers.norm_layer(x, self.norm, train=train, name="bn1"))
        if not self.small_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
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
