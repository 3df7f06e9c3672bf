"""The weight initialisation shared by every zoo model."""

from __future__ import annotations

from torch import nn


def kaiming_init_(model: nn.Module) -> None:
    """Initialise ``model`` in place, as torchvision does: Kaiming-normal (fan-out) convolutions,
    identity BatchNorm, ``Linear`` weights from N(0, 0.01²), zero biases.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
        >>> kaiming_init_(net)
        >>> bool((net[1].weight == 1).all()), bool((net[1].bias == 0).all())
        (True, True)
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
        else:
            continue
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
