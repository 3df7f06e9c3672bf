"""CIFAR data: the ``CIFARDataModule``, readers for the on-disk layouts, batched augmentation."""

from lightning_compress.data.datamodule import CIFARDataModule

__all__ = ["CIFARDataModule"]
