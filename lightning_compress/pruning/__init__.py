"""Pruning: schedules and masks (pure math) and the callbacks that apply them during training."""

from lightning_compress.pruning.channel import ChannelPruning
from lightning_compress.pruning.magnitude import MagnitudePruning
from lightning_compress.pruning.schedules import (
    SCHEDULES,
    constant_sparsity,
    cubic_sparsity,
    exponential_sparsity,
    linear_sparsity,
    resolve_schedule,
)

__all__ = [
    "SCHEDULES",
    "ChannelPruning",
    "MagnitudePruning",
    "constant_sparsity",
    "cubic_sparsity",
    "exponential_sparsity",
    "linear_sparsity",
    "resolve_schedule",
]
