"""The model zoo: CIFAR networks created by name.

Importing this package registers every family (one file each): ``resnet20`` ... ``resnet110``
(:mod:`.resnet_cifar`), ``resnet18`` (:mod:`.resnet`), ``mobilenetv2`` (:mod:`.mobilenetv2`),
``vgg11_bn`` and ``vgg16_bn`` (:mod:`.vgg`).

Example:
    >>> from lightning_compress.models import create_model, list_models
    >>> print(", ".join(list_models()))
    mobilenetv2, resnet110, resnet18, resnet20, resnet32, resnet44, resnet56, vgg11_bn, vgg16_bn
"""

# Importing the family modules registers their models.
from lightning_compress.models import mobilenetv2, resnet, resnet_cifar, vgg  # noqa: F401
from lightning_compress.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
