"""The model zoo: CIFAR networks created by name, one family per module.

Example:
    >>> from lightning_compress.models import create_model, list_models
    >>> print(", ".join(list_models()))
    mobilenetv2, resnet110, resnet18, resnet20, resnet32, resnet44, resnet56, vgg11_bn, vgg16_bn
"""

# Importing the family modules registers their models.
from lightning_compress.models import mobilenetv2, resnet, resnet_cifar, vgg  # noqa: F401
from lightning_compress.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
