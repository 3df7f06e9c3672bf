"""Pruning: schedules, masks and patterns (pure math) and the callbacks that apply them during training."""

from lightning_compress.pruning.channel import ChannelPruning
from lightning_compress.pruning.magnitude import MagnitudePruning
from lightning_compress.pruning.patterns import NM, Channel, PruningPattern, Unstructured, parse_pattern
from lightning_compress.pruning.schedules import (
    SCHEDULES,
    constant_sparsity,
    cubic_sparsity,
    exponential_sparsity,
    linear_sparsity,
    resolve_schedule,
)

__all__ = [
    "NM",
    "SCHEDULES",
    "Channel",
    "ChannelPruning",
    "MagnitudePruning",
    "PruningPattern",
    "Unstructured",
    "constant_sparsity",
    "cubic_sparsity",
    "exponential_sparsity",
    "linear_sparsity",
    "parse_pattern",
    "resolve_schedule",
]
