"""VGG-11 and VGG-16 with BatchNorm (Simonyan & Zisserman 2015) for 32x32 inputs.

``features`` is the usual stack of 3x3 Conv-BN-ReLU layers with five 2x2 max-pools, which takes a
32x32 image to 1x1x512; the classifier is 512-512-``num_classes`` with ReLU and dropout (the
chenyaofo/pytorch-cifar-models head), giving 9.76M (VGG-11-BN) and 15.25M (VGG-16-BN) parameters for
10 classes.

The forward pass has no data-dependent Python control flow, so ``torch.fx.symbolic_trace`` works, and
every ReLU is its own ``nn.ReLU`` module directly after its Conv-BN, so Conv-BN-ReLU fusion applies.

Example:
    >>> import torch
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

    Args:
        config: Layer plan, see :data:`VGG_CONFIGS`; must contain five ``"M"`` so 32x32 inputs end at 1x1.
        num_classes: Number of output classes.
        dropout: Dropout probability in the classifier, in [0, 1).

    Raises:
        ValueError: If ``config`` does not have exactly five max-pools or holds anything but
            positive ints and ``"M"``, or ``dropout`` is outside [0, 1).

    Example:
        >>> VGG((8, "M", 16, "M", 16, "M", 16, "M", 16, "M"), num_classes=4).classifier[-1]
        Linear(in_features=512, out_features=4, bias=True)
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
    """VGG-11 with BatchNorm for CIFAR (~9.76M parameters for 10 classes).

    Args:
        num_classes: Number of output classes.
        dropout: Dropout probability in the classifier.

    Returns:
        The freshly initialised model.
    """
    return VGG(VGG_CONFIGS["vgg11_bn"], num_classes=num_classes, dropout=dropout)


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, dropout: float = 0.5) -> VGG:
    """VGG-16 with BatchNorm for CIFAR (~15.25M parameters for 10 classes).

    Args:
        num_classes: Number of output classes.
        dropout: Dropout probability in the classifier.

    Returns:
        The freshly initialised model.
    """
    return VGG(VGG_CONFIGS["vgg16_bn"], num_classes=num_classes, dropout=dropout)
