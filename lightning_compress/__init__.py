"""lightning-compress: model compression as PyTorch Lightning callbacks.

Add callbacks to the Trainer you already have; the model leaves ``fit`` pruned, quantized and/or
distilled:

    >>> from lightning_compress import MagnitudePruning, QuantizationAwareTraining
    >>> callbacks = [MagnitudePruning(final_sparsity=0.9), QuantizationAwareTraining()]
"""

from lightning_compress.data import CIFARDataModule
from lightning_compress.distillation import KnowledgeDistillation
from lightning_compress.factorization import LowRankFactorization
from lightning_compress.models import create_model, list_models
from lightning_compress.module import ImageClassifier
from lightning_compress.pruning import ChannelPruning, MagnitudePruning
from lightning_compress.quantization import PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.report import CompressionReport

__version__ = "0.1.0"

__all__ = [
    "CIFARDataModule",
    "ChannelPruning",
    "CompressionReport",
    "ImageClassifier",
    "KnowledgeDistillation",
    "LowRankFactorization",
    "MagnitudePruning",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "create_model",
    "list_models",
]
