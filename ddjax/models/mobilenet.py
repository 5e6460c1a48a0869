"""torchvision's MobileNet-V2 (Sandler et al., CVPR 2018), an ImageNet-scale student network.

Promise: :class:`MobileNetV2` is torchvision's ``mobilenet_v2`` (3,504,872 parameters at 1000
classes and ``width_mult=1``): the same layers in the same order, ReLU6, BatchNorm with
PyTorch's momentum and eps, dropout before the classifier in train mode. Its Flax module names
(``stem_conv``, ``block_{i}`` with ``expand_*``/``depthwise_*``/``project_*``, ``last_conv``,
``classifier``) are what :mod:`ddjax.models.torch_io` maps to torchvision's ``features.{i}…`` and
``classifier.1`` keys; :func:`inverted_residual_blocks` is the block list both read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.errors import DDJaxError, check
from ddjax.models import layers
from ddjax.models.conv import CONV_GRADS

#: The paper's Table 2 as torchvision writes it: (expansion t, channels c, repeats n, stride s).
INVERTED_RESIDUAL_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def round_channels(channels: float, divisor: int = 8) -> int:
    """Channels scaled by ``width_mult`` as torchvision rounds them (its ``_make_divisible``).

    The nearest multiple of ``divisor``, at least ``divisor``, and one step up where rounding
    would lose more than 10 %. Identity on the published channels at ``width_mult=1``.
    """
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


@dataclasses.dataclass(frozen=True)
class InvertedResidualBlock:
    """One block: ``features.{index}`` in torchvision, ``block_{index}`` here."""

    index: int
    in_channels: int
    out_channels: int
    stride: int
    expansion: int  # 1: no 1×1 expansion conv (the first block)


def inverted_residual_blocks(width_mult: float = 1.0) -> Iterator[InvertedResidualBlock]:
    """The 17 blocks of MobileNet-V2 in order (``features.1`` to ``features.17``)."""
    in_channels = round_channels(STEM_CHANNELS * width_mult)
    index = 1
    for expansion, channels, repeats, stride in INVERTED_RESIDUAL_SETTINGS:
        out_channels = round_channels(channels * width_mult)
        for repeat in range(repeats):
            block_stride = stride if repeat == 0 else 1
            yield InvertedResidualBlock(index, in_channels, out_channels, block_stride, expansion)
            in_channels = out_channels
            index += 1


def _conv_bn(
    x: jax.Array,
    features: int,
    kernel_size: int,
    name: str,
    *,
    train: bool,
    conv_init: str,
    conv_grad: str,
    stride: int = 1,
    groups: int = 1,
    relu6: bool = True,
) -> jax.Array:
    """torchvision's ``Conv2dNormActivation``: conv (no bias, 'same' padding) → BN (→ ReLU6).

    Called inside a compact method; the layers are that module's ``{name}_conv``/``{name}_bn``.
    """
    x = layers.conv2d(
        x,
        features,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2,
        use_bias=False,
        groups=groups,
        init=conv_init,
        conv_grad=conv_grad,
        name=f"{name}_conv",
    )
    x = layers.norm_layer(x, "batch", train=train, name=f"{name}_bn")
    return jax.nn.relu6(x) if relu6 else x


class MobileNetV2(nn.Module):
    """torchvision's MobileNet-V2: a 3×3 stem, 17 inverted residual blocks, a 1×1 conv to 1280.

    Each block expands its input t-fold with a 1×1 conv (skipped for t = 1), filters it with a
    3×3 depthwise conv that carries the stride, and projects it back with a linear 1×1 conv;
    blocks with stride 1 and equal in/out channels add their input. The head pools globally and
    applies ``Dropout(dropout)`` then a linear layer.

    Dropout is the one random layer in ddjax's models: in train mode with ``dropout > 0`` the
    call needs a ``'dropout'`` RNG, ``model.apply(..., train=True, rngs={'dropout': key})``, and
    says so if it is missing. ``dropout=0.0`` gives a deterministic train mode (BatchNorm with
    batch statistics only), which is what a step that passes no RNG needs. Eval mode never
    drops.

    Attributes:
        num_classes: outputs of the linear head.
        width_mult: channel multiplier, rounded to multiples of 8 as torchvision does (1.0 is
            the published network; smaller values are for tests). The last conv keeps 1280
            channels for ``width_mult ≤ 1``.
        small_stem: first conv with stride 1 instead of 2, for CIFAR-size inputs (MobileNet's
            counterpart of the ResNets' small-image stem); the state_dict keys are the same.
        dropout: drop probability before the classifier in train mode (torchvision: 0.2).
        conv_init: ``'torchvision'`` (default; kaiming-normal fan-out convs, classifier
            N(0, 0.01²) with zero bias, BatchNorm γ = 1, β = 0) or ``'pytorch'`` (PyTorch's
            default U(±1/√fan_in) for convs and the classifier).
        conv_grad: CPU convolution gradient, ``'fast'`` (ddjax's) or ``'xla'`` (:data:`CONV_GRADS`).
    """

    num_classes: int
    width_mult: float = 1.0
    small_stem: bool = False
    dropout: float = 0.2
    conv_init: str = "torchvision"
    conv_grad: str = "fast"

    def __post_init__(self) -> None:
        owner = "MobileNetV2"
        layers.check_positive_int(owner, "num_classes", self.num_classes)
        number = isinstance(self.width_mult, int | float | np.number)
        check(
            number and not isinstance(self.width_mult, bool) and self.width_mult > 0,
            f"{owner}.width_mult must be a positive number, got {self.width_mult!r}",
        )
        layers.check_choice(owner, "small_stem", self.small_stem, (True, False))
        number = isinstance(self.dropout, int | float | np.number)
        check(
            number and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0,
            f"{owner}.dropout must be a probability in [0, 1), got {self.dropout!r}",
        )
        layers.check_choice(owner, "conv_init", self.conv_init, ("pytorch", "torchvision"))
        layers.check_choice(owner, "conv_grad", self.conv_grad, CONV_GRADS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes) or features (N, 1280 or more)."""
        options = dict(train=train, conv_init=self.conv_init, conv_grad=self.conv_grad)
        stem_channels = round_channels(STEM_CHANNELS * self.width_mult)
        stem_stride = 1 if self.small_stem else 2
        x = _conv_bn(x, stem_channels, 3, "stem", stride=stem_stride, **options)
        for block in inverted_residual_blocks(self.width_mult):
            x = _InvertedResidual(
                block, self.conv_init, self.conv_grad, name=f"block_{block.index}"
            )(x, train)
        last_channels = round_channels(LAST_CHANNELS * max(1.0, self.width_mult))
        x = _conv_bn(x, last_channels, 1, "last", **options)

        features = jnp.mean(x, axis=(1, 2))
        if features_only:
            return features
        if train and self.dropout > 0:
            if not self.has_rng("dropout"):
                raise DDJaxError(
                    f"MobileNetV2 applies dropout {self.dropout} in train mode: pass "
                    "rngs={'dropout': key} to apply, or build it with dropout=0.0"
                )
            features = nn.Dropout(self.dropout, deterministic=False, name="dropout")(features)
        normal_std = 0.01 if self.conv_init == "torchvision" else None
        return layers.dense(features, self.num_classes, name="classifier", normal_std=normal_std)


class _InvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual``: [1×1 expand →] 3×3 depthwise → 1×1 project (+ x)."""

    block: InvertedResidualBlock
    conv_init: str
    conv_grad: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        block = self.block
        options = dict(train=train, conv_init=self.conv_init, conv_grad=self.conv_grad)
        # torchvision: hidden_dim = int(round(inp * expand_ratio)); exact for integer ratios.
        hidden = block.in_channels * block.expansion
        out = x
        if block.expansion != 1:
            out = _conv_bn(out, hidden, 1, "expand", **options)
        out = _conv_bn(out, hidden, 3, "depthwise", stride=block.stride, groups=hidden, **options)
        out = _conv_bn(out, block.out_channels, 1, "project", relu6=False, **options)
        if block.stride == 1 and block.in_channels == block.out_channels:
            out = out + x
        return out
