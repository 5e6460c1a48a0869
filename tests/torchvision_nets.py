"""PyTorch re-statements of torchvision's ResNet-18/50/101 and MobileNet-V2, for ddjax's tests.

torchvision is not a test dependency, so its networks are written out here from the published
architectures, with torchvision's module names and registration order: their ``state_dict`` keys
(``conv1``, ``bn1``, ``layer2.0.downsample.1``, ``fc``; ``features.1.conv.0.0``,
``classifier.1``) are torchvision's, and a state_dict saved from them is what a user's
torchvision ``.pth`` holds. ``width`` is 64 (MobileNet-V2: ``width_mult`` 1.0) in torchvision;
smaller values keep tests fast. ``small_stem`` is SRe2L's CIFAR-size change (``conv1 =
Conv2d(3, 64, 3, 1, 1, bias=False)``, ``maxpool = Identity``).

Importing this module imports torch: test files import it after ``pytest.importorskip('torch')``.
"""

from __future__ import annotations

import torch
from torch import nn

# MobileNet-V2's Table 2 (expansion t, channels c, repeats n, stride s), restated from the paper.
MOBILENET_V2_TABLE = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
RESNET_BLOCKS = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """torchvision's ``downsample``: a 1×1 conv and BatchNorm where the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """ResNet-18's block: two 3×3 convs (the first one strided)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """ResNet-50/101's block: 1×1, strided 3×3 (torchvision's "v1.5"), 1×1 to 4× the planes."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU()
        self.downsample = _shortcut(in_planes, out_planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ``ResNet``: stem, four stages of ``blocks[i]`` blocks, global pool, ``fc``."""

    def __init__(self, depth: int, num_classes: int, *, width: int = 64, small_stem: bool = False):
        super().__init__()
        block = BasicBlock if depth == 18 else Bottleneck
        if small_stem:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        in_planes = width
        for stage, num_blocks in enumerate(RESNET_BLOCKS[depth]):
            planes = width * 2**stage
            layer = []
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layer.append(block(in_planes, planes, stride))
                in_planes = block.expansion * planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(x.mean(dim=(2, 3)))


class ConvBNReLU6(nn.Sequential):
    """torchvision's ``Conv2dNormActivation`` with ReLU6, as MobileNet-V2 uses it."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1):
        padding = (kernel_size - 1) // 2
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        layers = [ConvBNReLU6(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``mobilenet_v2`` at ``width_mult=1``."""

    def __init__(self, num_classes: int, small_stem: bool, dropout: float):
        super().__init__()
        features = [ConvBNReLU6(3, 32, 3, 1 if small_stem else 2)]
        channels = 32
        for expansion, out_channels, repeats, stride in MOBILENET_V2_TABLE:
            for repeat in range(repeats):
                block_stride = stride if repeat == 0 else 1
                features.append(InvertedResidual(channels, out_channels, block_stride, expansion))
                channels = out_channels
        features.append(ConvBNReLU6(channels, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def randomise_batchnorm(net: nn.Module, seed: int) -> nn.Module:
    """Gives every BatchNorm a trained-looking state: random affine and running statistics.

    A freshly built network has γ = 1, β = 0, mean 0 and variance 1 everywhere, which would let
    a conversion that swapped or dropped those tensors pass unnoticed.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor, low, high):
        tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))

    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.3, 0.3)
                uniform(module.running_mean, -0.5, 0.5)
                uniform(module.running_var, 0.5, 2.0)
    return net
