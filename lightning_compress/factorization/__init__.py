"""Low-rank factorization: layers replaced by thinner low-rank or depthwise-separable blocks during fit."""

from lightning_compress.factorization.blocks import factorize_layer
from lightning_compress.factorization.callback import LowRankFactorization
from lightning_compress.factorization.decompositions import decompose, full_rank, truncation_errors

__all__ = ["LowRankFactorization", "decompose", "factorize_layer", "full_rank", "truncation_errors"]
