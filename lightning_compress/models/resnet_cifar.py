"""The CIFAR ResNets of He et al. (2016): ResNet-20/32/44/56/110.

Depth ``6n + 2``: a 3x3 stem convolution with 16 channels, three stages of ``n`` BasicBlocks with
16/32/64 channels (the last two halve the resolution), global average pooling and the classifier.
The implementation is :class:`lightning_compress.models.resnet.ResNet`.

One deliberate change from the paper's CIFAR networks: where a stage changes the shape, the shortcut
is a 1x1 convolution + BatchNorm projection ("option B") instead of the paper's parameter-free
zero-padding identity ("option A"). Channel pruning (torch-pruning's ``DependencyGraph``) and FX
quantization treat a projection as ordinary layers, while option A's strided slicing and channel
zero-padding (a lambda in most implementations) is opaque to the dependency graph, so the channels
of a residual sum could not be pruned consistently. The two projections add 2,752 parameters
(272,474 instead of 269,722 for ResNet-20), within 2 % of the paper's 0.27M and 0.85M (ResNet-56).

Example:
    >>> from lightning_compress.models import create_model
    >>> sum(p.numel() for p in create_model("resnet20").parameters())
    272474
"""

from __future__ import annotations

from lightning_compress.models.registry import register_model
from lightning_compress.models.resnet import ResNet


def cifar_resnet(depth: int, num_classes: int = 10) -> ResNet:
    """A He et al. CIFAR ResNet of any depth ``6n + 2``.

    Args:
        depth: Number of weighted layers, ``6n + 2`` for ``n >= 1`` (e.g. 20, 56, 110).
        num_classes: Number of output classes.

    Returns:
        The freshly initialised model.

    Raises:
        ValueError: If ``depth`` is not of the form ``6n + 2``.

    Example:
        >>> len(cifar_resnet(depth=8).layer1)
        1
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth!r}")
    blocks = (depth - 2) // 6
    return ResNet((blocks, blocks, blocks), (16, 32, 64), num_classes=num_classes)


@register_model("resnet20")
def resnet20(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-20 (He et al. 2016, projection shortcuts); see :func:`cifar_resnet`.

    Args:
        num_classes: Number of output classes.

    Returns:
        The freshly initialised model.
    """
    return cifar_resnet(20, num_classes=num_classes)


@register_model("resnet32")
def resnet32(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-32 (He et al. 2016, projection shortcuts); see :func:`cifar_resnet`.

    Args:
        num_classes: Number of output classes.

    Returns:
        The freshly initialised model.
    """
    return cifar_resnet(32, num_classes=num_classes)


@register_model("resnet44")
def resnet44(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-44 (He et al. 2016, projection shortcuts); see :func:`cifar_resnet`.

    Args:
        num_classes: Number of output classes.

    Returns:
        The freshly initialised model.
    """
    return cifar_resnet(44, num_classes=num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-56 (He et al. 2016, projection shortcuts); see :func:`cifar_resnet`.

    Args:
        num_classes: Number of output classes.

    Returns:
        The freshly initialised model.
    """
    return cifar_resnet(56, num_classes=num_classes)


@register_model("resnet110")
def resnet110(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-110 (He et al. 2016, projection shortcuts); see :func:`cifar_resnet`.

    Args:
        num_classes: Number of output classes.

    Returns:
        The freshly initialised model.
    """
    return cifar_resnet(110, num_classes=num_classes)
