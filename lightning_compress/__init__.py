"""lightning-compress: model compression as PyTorch Lightning callbacks.

Add callbacks to the Trainer you already have; the model leaves ``fit`` pruned, quantized and/or
distilled:

    >>> from lightning_compress import MagnitudePruning, QuantizationAwareTraining
    >>> callbacks = [MagnitudePruning(final_sparsity=0.9), QuantizationAwareTraining()]
"""

from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.composition import Declaration, Effect
from lightning_compress.core.progress import StepBudget, StepWindow
from lightning_compress.data import CIFARDataModule
from lightning_compress.distillation import KnowledgeDistillation
from lightning_compress.factorization import LowRankFactorization
from lightning_compress.models import create_model, list_models
from lightning_compress.module import ImageClassifier
from lightning_compress.planning import CompressToTarget
from lightning_compress.pruning import ChannelPruning, MagnitudePruning
from lightning_compress.quantization import PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.report import CompressionReport

__version__ = "0.1.0"

__all__ = [
    "CIFARDataModule",
    "ChannelPruning",
    "CompressionCallback",
    "CompressToTarget",
    "CompressionReport",
    "Declaration",
    "Effect",
    "ImageClassifier",
    "KnowledgeDistillation",
    "LowRankFactorization",
    "MagnitudePruning",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "StepBudget",
    "StepWindow",
    "create_model",
    "list_models",
]
