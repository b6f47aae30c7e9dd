"""torchvision's ImageNet ResNet (v1.5) written out in PyTorch, for machines without torchvision.

`benchmarks/gpu_vs_torch.py` compares this package's ResNet-50 with PyTorch's. On the GPU image
torchvision is installed and `torchvision.models.resnet50()` is used; where torchvision does not
import (this project's CPU venv: its torch build has no matching torchvision), this module builds
the same network with the same parameter names, so

    cnn.models.convert.from_torchvision("resnet50", net.state_dict())

loads it into `cnn.models.create("resnet50")` (checked in `tests/benchmarks/test_gpu_vs_torch.py`).

Layout (torchvision, He et al. 2016 with the v1.5 stride on the 3x3 conv of a bottleneck):
stem conv7x7/2 (64, no bias) - BN - ReLU - max pool 3x3/2 (pad 1); four stages (`layer1`..
`layer4`) of basic blocks (depth 18, 34) or bottlenecks (50, 101, 152) with 64, 128, 256, 512
inner maps (x4 out for bottlenecks) and strides 1, 2, 2, 2; a projection shortcut
(`downsample`: conv1x1 + BN) where the shape changes; global average pool; linear classifier.
Convolutions He-normal (fan-out), BatchNorm weight 1, bias 0, as torchvision initializes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """`relu(x' + BN(conv3x3(relu(BN(conv3x3(x, stride))))))`, `x'` the (projected) input."""

    expansion = 1

    def __init__(self, in_channels: int, features: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, features, stride)
        self.bn1 = nn.BatchNorm2d(features)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(features, features)
        self.bn2 = nn.BatchNorm2d(features)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """conv1x1 - BN - ReLU - conv3x3(stride) - BN - ReLU - conv1x1 (4x maps) - BN, plus shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, features: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(in_channels, features)
        self.bn1 = nn.BatchNorm2d(features)
        self.conv2 = conv3x3(features, features, stride)
        self.bn2 = nn.BatchNorm2d(features)
        self.conv3 = conv1x1(features, features * self.expansion)
        self.bn3 = nn.BatchNorm2d(features * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class ResNet(nn.Module):
    """ImageNet ResNet: `[batch, 3, h, w]` (NCHW; channels_last memory works) -> `[batch, num_classes]`."""

    def __init__(self, block: type[nn.Module], stage_sizes: Sequence[int], num_classes: int = 1000):
        super().__init__()
        self.in_channels = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, stage_sizes[0], 1)
        self.layer2 = self._stage(block, 128, stage_sizes[1], 2)
        self.layer3 = self._stage(block, 256, stage_sizes[2], 2)
        self.layer4 = self._stage(block, 512, stage_sizes[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _stage(self, block: type[nn.Module], features: int, num_blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_channels != features * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.in_channels, features * block.expansion, stride), nn.BatchNorm2d(features * block.expansion)
            )
        layers = [block(self.in_channels, features, stride, downsample)]
        self.in_channels = features * block.expansion
        layers += [block(self.in_channels, features) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth: int = 50, *, num_classes: int = 1000, stage_sizes: Sequence[int] | None = None) -> ResNet:
    """torchvision's `resnet{depth}()` (random init); `stage_sizes` overrides the blocks per stage
    (as `cnn.models.create("resnet", depth=..., stage_sizes=...)` does)."""
    if depth not in STAGE_SIZES:
        raise ValueError(f"depth={depth!r} is not an ImageNet ResNet depth; valid: {sorted(STAGE_SIZES)}")
    sizes = tuple(stage_sizes) if stage_sizes is not None else STAGE_SIZES[depth]
    if len(sizes) != 4 or min(sizes) < 1:
        raise ValueError(f"stage_sizes={stage_sizes!r} must be 4 positive block counts")
    return ResNet(BasicBlock if depth < 50 else Bottleneck, sizes, num_classes)


__all__ = ["BasicBlock", "Bottleneck", "ResNet", "STAGE_SIZES", "resnet"]
