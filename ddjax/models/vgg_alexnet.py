"""MTT's VGG11 (instance or batch norm) and AlexNet, both with MTT's padding for 28-px grey images.

Promise: the same call signature as every ddjax model (:mod:`ddjax.models`);
:data:`VGG11_CFG` is MTT's ``cfg_vgg['VGG11']``, which fixes both the layer sequence here and the
``nn.Sequential`` indices of the PyTorch state_dict (:mod:`ddjax.models.torch_io`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from ddjax.models import layers
from ddjax.models.conv import CONV_GRADS

# MTT's cfg_vgg['VGG11']: conv widths, 'M' = 2×2 max-pool.
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """MTT's VGG11: [conv3×3 → norm → ReLU] blocks with 5 max-pools, then one linear layer.

    Like MTT's ConvNet, the first conv pads by 3 for one-channel input (28 → 32 px). At 32 px
    the head sees 512 features; other sizes flatten the final map in (C, H, W) order (MTT's
    fixed 512-input head only accepts 28/32-px inputs).

    Attributes:
        num_classes: outputs of the linear head.
        norm: ``'instance'`` (``VGG11``) or ``'batch'`` (``VGG11BN``).
        conv_grad: CPU convolution gradient, ``'fast'`` (ddjax's) or ``'xla'`` (:data:`CONV_GRADS`).
    """

    num_classes: int
    norm: str = "instance"
    conv_grad: str = "fast"

    def __post_init__(self) -> None:
        layers.check_positive_int("VGG11", "num_classes", self.num_classes)
        layers.check_choice("VGG11", "norm", self.norm, ("instance", "batch"))
        layers.check_choice("VGG11", "conv_grad", self.conv_grad, CONV_GRADS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes) or features (N, F)."""
        in_channels = x.shape[-1]
        for index, entry in enumerate(VGG11_CFG):
            if entry == "M":
                x = layers.max_pool(x)
                continue
            padding = 3 if in_channels == 1 and index == 0 else 1
            x = layers.conv2d(
                x, entry, 3, padding=padding, conv_grad=self.conv_grad, name=f"conv_{index}"
            )
            x = nn.relu(layers.norm_layer(x, self.norm, train=train, name=f"norm_{index}"))
        features = layers.flatten_chw(x)
        if features_only:
            return features
        return layers.dense(features, self.num_classes, name="classifier")


class AlexNet(nn.Module):
    """MTT's AlexNet: convs 128-192-256-192-192 (5×5, 5×5, 3×3 ×3), ReLU, no normalisation.

    Max-pools (2×2) follow the first, second and fifth conv; the first conv pads by 4 instead of
    2 for one-channel input (28 → 32 px), so both 32-px RGB and 28-px grey images end at
    192·4·4 = 3,072 head features.

    Attributes:
        num_classes: outputs of the linear head (``fc`` in PyTorch).
        conv_grad: CPU convolution gradient, ``'fast'`` (ddjax's) or ``'xla'`` (:data:`CONV_GRADS`).
    """

    num_classes: int
    conv_grad: str = "fast"

    def __post_init__(self) -> None:
        layers.check_positive_int("AlexNet", "num_classes", self.num_classes)
        layers.check_choice("AlexNet", "conv_grad", self.conv_grad, CONV_GRADS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes) or features (N, F)."""
        del train  # no batch statistics; accepted so every model has the same signature
        conv = functools.partial(layers.conv2d, conv_grad=self.conv_grad)
        x = conv(x, 128, 5, padding=4 if x.shape[-1] == 1 else 2, name="conv_0")
        x = layers.max_pool(nn.relu(x))
        x = layers.max_pool(nn.relu(conv(x, 192, 5, padding=2, name="conv_1")))
        x = nn.relu(conv(x, 256, 3, padding=1, name="conv_2"))
        x = nn.relu(conv(x, 192, 3, padding=1, name="conv_3"))
        x = layers.max_pool(nn.relu(conv(x, 192, 3, padding=1, name="conv_4")))
        features = layers.flatten_chw(x)
        if features_only:
            return features
        return layers.dense(features, self.num_classes, name="fc")
