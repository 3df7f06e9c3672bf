"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs.

torchvision's architecture and parameter count, with the stem and the 24-channel stage at stride 1
instead of 2 (4x4 maps before pooling). FX-traceable; every ``nn.ReLU6`` follows its Conv-BN, for fusion.

Example:
    >>> model = MobileNetV2(num_classes=10, width_mult=0.25)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.models.initialization import kaiming_init_
from lightning_compress.models.registry import register_model

# (expansion t, output channels c, blocks n, stride of the first block s); torchvision has s=2 for
# the 24-channel stage, CIFAR variants use 1.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` (>= ``divisor``), losing at most 10 %.

    Example:
        >>> make_divisible(32 * 0.5), make_divisible(24 * 0.35)
        (16, 8)
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """A Conv-BN-ReLU6 sequence (children ``0``, ``1``, ``2``); padding keeps the resolution at stride 1."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion by ``expand_ratio`` (1: none), 3x3 depthwise convolution, linear 1x1 projection;
    residual if the shape is kept.

    Example:
        >>> block = InvertedResidual(16, 16, stride=1, expand_ratio=6)
        >>> block.use_residual, block(torch.randn(1, 16, 8, 8)).shape
        (True, torch.Size([1, 16, 8, 8]))
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs: ``features``, ``avgpool``, ``flatten``, ``classifier`` (dropout, Linear).

    ``width_mult`` multiplies every layer's channels (rounded to multiples of 8); the last convolution
    keeps at least 1280, as in the paper. ``dropout`` before the classifier is in [0, 1).
    """

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        in_channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_bn_relu6(3, in_channels, 3, stride=1)]
        for expand_ratio, channels, blocks, stride in _INVERTED_RESIDUAL_SETTING:
            out_channels = make_divisible(channels * width_mult)
            for index in range(blocks):
                features.append(
                    InvertedResidual(in_channels, out_channels, stride if index == 0 else 1, expand_ratio)
                )
                in_channels = out_channels
        features.append(conv_bn_relu6(in_channels, last_channels, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2 for CIFAR (~2.24M parameters for 10 classes); see :class:`MobileNetV2`."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, dropout=dropout)
