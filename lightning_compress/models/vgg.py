"""VGG-11 and VGG-16 with BatchNorm (Simonyan & Zisserman 2015) for 32x32 inputs.

Five max-pools take an image to 1x1x512; the classifier is 512-512-``num_classes`` with ReLU and
dropout. FX-traceable; every ``nn.ReLU`` follows its Conv-BN, for fusion.

Example:
    >>> model = VGG(VGG_CONFIGS["vgg11_bn"], num_classes=10)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_compress.models.initialization import kaiming_init_
from lightning_compress.models.registry import register_model

VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11_bn": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16_bn": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
"""Layer plans: an int is a 3x3 Conv-BN-ReLU with that many channels, ``"M"`` a 2x2 max-pool."""


class VGG(nn.Module):
    """A VGG network with BatchNorm: ``features``, ``flatten``, ``classifier`` (last ``nn.Linear``).

    ``config`` is a layer plan as in :data:`VGG_CONFIGS`, with exactly five ``"M"``; ``dropout`` is in [0, 1).
    """

    def __init__(self, config: Sequence[int | str], num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        if list(config).count("M") != 5 or not all(
            item == "M" or (isinstance(item, int) and item > 0) for item in config
        ):
            raise ValueError(
                f"config must hold positive ints and exactly five 'M' (max-pools), got {list(config)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(in_channels, item, 3, padding=1, bias=False),
                    nn.BatchNorm2d(item),
                    nn.ReLU(),
                ]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register_model("vgg11_bn")
def vgg11_bn(num_classes: int = 10, dropout: float = 0.5) -> VGG:
    """VGG-11 with BatchNorm for CIFAR (~9.76M parameters for 10 classes); see :class:`VGG`."""
    return VGG(VGG_CONFIGS["vgg11_bn"], num_classes=num_classes, dropout=dropout)


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, dropout: float = 0.5) -> VGG:
    """VGG-16 with BatchNorm for CIFAR (~15.25M parameters for 10 classes); see :class:`VGG`."""
    return VGG(VGG_CONFIGS["vgg16_bn"], num_classes=num_classes, dropout=dropout)
