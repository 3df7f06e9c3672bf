"""The CIFAR ResNets of He et al. (2016): ResNet-20/32/44/56/110, three stages of 16/32/64 channels.

Unlike the paper, shape-changing shortcuts are projections (see :mod:`.resnet`), which channel
pruning can follow; they add 2,752 parameters to ResNet-20.

Example:
    >>> from lightning_compress.models import create_model
    >>> sum(p.numel() for p in create_model("resnet20").parameters())
    272474
"""

from __future__ import annotations

from lightning_compress.models.registry import register_model
from lightning_compress.models.resnet import ResNet


def cifar_resnet(depth: int, num_classes: int = 10) -> ResNet:
    """A He et al. CIFAR ResNet of any depth ``6n + 2`` with ``n >= 1`` (``ValueError`` otherwise)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth!r}")
    blocks = (depth - 2) // 6
    return ResNet((blocks, blocks, blocks), (16, 32, 64), num_classes=num_classes)


@register_model("resnet20")
def resnet20(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-20; see :func:`cifar_resnet`."""
    return cifar_resnet(20, num_classes=num_classes)


@register_model("resnet32")
def resnet32(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-32; see :func:`cifar_resnet`."""
    return cifar_resnet(32, num_classes=num_classes)


@register_model("resnet44")
def resnet44(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-44; see :func:`cifar_resnet`."""
    return cifar_resnet(44, num_classes=num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-56; see :func:`cifar_resnet`."""
    return cifar_resnet(56, num_classes=num_classes)


@register_model("resnet110")
def resnet110(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-110; see :func:`cifar_resnet`."""
    return cifar_resnet(110, num_classes=num_classes)
