"""ResNet with a CIFAR stem (3x3 stride-1 first convolution, no max-pool) and BasicBlocks.

Behind ``resnet18`` and the CIFAR ResNets of :mod:`.resnet_cifar`. A shortcut that changes the shape
is a 1x1 Conv-BN projection (``downsample``, "option B" of He et al.): ordinary layers that channel
pruning and FX quantization handle without special cases. FX-traceable, one ``nn.ReLU`` per use.

Example:
    >>> model = ResNet(stage_blocks=(1, 1), stage_widths=(8, 16), num_classes=3)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_compress.models.initialization import kaiming_init_
from lightning_compress.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN layers with a residual connection (He et al. 2016); ``stride`` is the first's.

    Example:
        >>> block = BasicBlock(16, 32, stride=2)
        >>> block(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """A ResNet of BasicBlocks for 32x32 inputs, with torchvision's names (``conv1``, ``layer1``, ``fc``).

    Stage ``i`` has ``stage_blocks[i]`` blocks of ``stage_widths[i]`` channels; every stage after the
    first halves the resolution.
    """

    def __init__(
        self, stage_blocks: Sequence[int], stage_widths: Sequence[int], num_classes: int = 10
    ) -> None:
        super().__init__()
        if not stage_blocks or len(stage_blocks) != len(stage_widths):
            raise ValueError(
                f"stage_blocks and stage_widths must be non-empty and of equal length, "
                f"got {list(stage_blocks)} and {list(stage_widths)}"
            )
        if min(stage_blocks) < 1 or min(stage_widths) < 1:
            raise ValueError(
                f"stage_blocks and stage_widths must be positive, "
                f"got {list(stage_blocks)} and {list(stage_widths)}"
            )
        self.conv1 = nn.Conv2d(3, stage_widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_widths[0])
        self.relu = nn.ReLU()
        in_channels = stage_widths[0]
        for index, (blocks, width) in enumerate(zip(stage_blocks, stage_widths, strict=True)):
            stride = 1 if index == 0 else 2
            stage = []
            for block_index in range(blocks):
                stage.append(BasicBlock(in_channels, width, stride if block_index == 0 else 1))
                in_channels = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.num_stages = len(stage_blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


@register_model("resnet18")
def resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18 with a CIFAR stem: stages of 2 blocks with 64/128/256/512 channels (~11.17M params)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes=num_classes)
