"""MTT's ConvNet (Cazenavette et al., CVPR 2022; from DC/DSA) and its depth/width/norm variants.

Promise: ``ConvNet(...).apply(variables, images, train=False, features_only=False)`` as described
in :mod:`ddjax.models`; parameter names and order match MTT's ``networks.ConvNet`` so that
:mod:`ddjax.models.torch_io` converts state_dicts without permutation of the feature axis.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from ddjax.errors import check
from ddjax.models import layers
from ddjax.models.conv import CONV_GRADS


class ConvNet(nn.Module):
    """MTT's ConvNet: ``depth`` × [3×3 conv → norm → ReLU → 2×2 pool], then one linear layer.

    The default (width 128, depth 3, instance norm, average pooling) is MTT's ``ConvNet``; depth
    4 is ``ConvNetD4`` for 64-px Tiny-ImageNet and depth 5 ``ConvNetD5`` for 128-px ImageNet
    subsets. Parameters: 320,010 on CIFAR-10, 504,420 on CIFAR-100, 317,706 on Fashion-MNIST
    (1×28×28), 857,160 for ConvNetD4 on Tiny-ImageNet.

    As in MTT, the first conv pads by 3 instead of 1 when the input has one channel, which turns
    28-px MNIST/Fashion-MNIST images into 32-px maps (2,048 head features at depth 3). MTT sizes
    its head from a hard-coded rule (28 px counts as 32) that only holds for the published
    sizes; here the head is sized from the actual feature map, which is identical wherever MTT's
    rule is consistent and also works for sizes where MTT would fail.

    Attributes:
        num_classes: outputs of the linear head.
        width: channels of every conv.
        depth: number of conv blocks.
        norm: ``'instance'`` | ``'batch'`` | ``'layer'`` | ``'group'`` | ``'none'``.
        pool: ``'avg'`` | ``'max'`` | ``'none'``.
        conv_grad: CPU convolution gradient, ``'fast'`` (ddjax's) or ``'xla'`` (:data:`CONV_GRADS`).
    """

    num_classes: int
    width: int = 128
    depth: int = 3
    norm: str = "instance"
    pool: str = "avg"
    conv_grad: str = "fast"

    def __post_init__(self) -> None:
        layers.check_positive_int("ConvNet", "num_classes", self.num_classes)
        layers.check_positive_int("ConvNet", "width", self.width)
        layers.check_positive_int("ConvNet", "depth", self.depth)
        layers.check_choice("ConvNet", "norm", self.norm, layers.NORMS)
        layers.check_choice("ConvNet", "pool", self.pool, layers.POOLS)
        layers.check_choice("ConvNet", "conv_grad", self.conv_grad, CONV_GRADS)
        if self.norm == "group":
            check(
                self.width % 4 == 0,
                f"ConvNet.width must be a multiple of 4 with norm='group' (GroupNorm(4, C)), "
                f"got {self.width}",
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes) or features (N, F)."""
        in_channels = x.shape[-1]
        for d in range(self.depth):
            padding = 3 if in_channels == 1 and d == 0 else 1
            x = layers.conv2d(
                x, self.width, 3, padding=padding, conv_grad=self.conv_grad, name=f"conv_{d}"
            )
            x = layers.norm_layer(x, self.norm, train=train, name=f"norm_{d}")
            x = nn.relu(x)
            if self.pool == "avg":
                x = layers.avg_pool(x)
            elif self.pool == "max":
                x = layers.max_pool(x)
        features = layers.flatten_chw(x)
        if features_only:
            return features
        return layers.dense(features, self.num_classes, name="classifier")
