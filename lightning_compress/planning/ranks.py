"""Low-rank factorization as planning variables: a Tucker-2 rank per ``k x k`` convolution, beside the widths.

A convolution factorized at rank ``r`` runs as three: ``1x1`` down to ``r`` channels, the ``k x k`` kernel between
``r`` channels, ``1x1`` back up (``LowRankFactorization``'s ``tucker2`` blocks,
:func:`~lightning_compress.factorization.blocks.factorize_layer`). :func:`factored_shapes` gives the layer shapes a
plan's widths and ranks run, so the latency table costs them as it costs any layer; :func:`rank_sensitivity`
measures, per layer and rank alone, how far the outputs move from the dense network's (as
:func:`~lightning_compress.planning.widths.width_sensitivity` does for widths, on the same scale).

Example:
    >>> from lightning_compress.planning.latency import LayerShape
    >>> conv = LayerShape("conv", 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))
    >>> rank_candidates(conv, round_to=8)
    [16, 32]
    >>> [(s.in_channels, s.out_channels, s.kernel) for s in factored_shapes({"c": conv}, {"c": 16}).values()]
    [(64, 16, (1, 1)), (16, 16, (3, 3)), (16, 64, (1, 1))]
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from lightning_compress.factorization.blocks import factorize_layer, max_rank
from lightning_compress.planning.latency import LayerShape
from lightning_compress.planning.widths import mean_distance, reference_outputs, slimmed_copy
from lightning_compress.pruning.importance import ImportanceLike

METHOD = "tucker2"
"""The factorization a plan's ranks stand for (``LowRankFactorization``'s method for ``k x k`` kernels)."""
RANK_FRACTIONS = (0.25, 0.5)
"""Candidate ranks, as fractions of a layer's smaller channel count (rounded down to ``round_to``)."""

Ranks = dict[str, int]


def rank_candidates(shape: LayerShape, round_to: int) -> list[int]:
    """Ranks worth planning for one layer: :data:`RANK_FRACTIONS` of its smaller channel count, multiples of
    ``round_to`` (none for ``1x1``, grouped or linear layers, or layers too thin for one multiple)."""
    if shape.kind != "conv" or shape.groups != 1 or shape.kernel == (1, 1):
        return []
    smaller = min(shape.in_channels, shape.out_channels)
    return sorted({rank for fraction in RANK_FRACTIONS
                   if 0 < (rank := int(fraction * smaller) // round_to * round_to) < smaller})


def factored_shapes(shapes: Mapping[str, LayerShape], ranks: Mapping[str, int]) -> dict[str, LayerShape]:
    """``shapes`` with each layer in ``ranks`` replaced by its three Tucker-2 factors (``<name>.0/1/2``), each rank
    capped at the layer's channels on its side (a width plan may have narrowed them)."""
    factored = {}
    for name, shape in shapes.items():
        if name not in ranks:
            factored[name] = shape
            continue
        rank_in, rank_out = min(ranks[name], shape.in_channels), min(ranks[name], shape.out_channels)
        pointwise = {"kernel": (1, 1), "stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1}
        factored[f"{name}.0"] = replace(shape, out_channels=rank_in, **pointwise)
        factored[f"{name}.1"] = replace(shape, in_channels=rank_in, out_channels=rank_out)
        factored[f"{name}.2"] = replace(shape, in_channels=rank_out, size=shape.output_size(), **pointwise)
    return factored


def factored_copy(network: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
    """A copy of ``network`` with each layer in ``ranks`` factorized from its weights (``network`` is unchanged).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        >>> [type(m).__name__ for m in factored_copy(net, {"2": 8})[2]]
        ['Conv2d', 'Conv2d', 'Conv2d']
    """
    clone = copy.deepcopy(network)
    for name, rank in ranks.items():
        layer = clone.get_submodule(name)
        clone.set_submodule(name, factorize_layer(layer, METHOD, min(rank, max_rank(layer, METHOD))))
    return clone


def planned_copy(network: nn.Module, example: torch.Tensor, widths: Mapping[str, int], ranks: Mapping[str, int],
                 importance: ImportanceLike = "l1") -> nn.Module:
    """A copy of ``network`` as a plan builds it: its groups slimmed to ``widths``
    (:func:`~lightning_compress.planning.widths.slimmed_copy`), then its ``ranks`` layers factorized."""
    return factored_copy(slimmed_copy(network, example, widths, importance), ranks)


def rank_sensitivity(network: nn.Module, inputs: Sequence[torch.Tensor], candidates: Mapping[str, Sequence[int]]
                     ) -> dict[str, dict[int, float]]:
    """Per layer and candidate rank: the output distance from the dense network when that layer alone is
    factorized at that rank (batch-norm statistics re-estimated on ``inputs`` for both, as for widths).

    Args:
        network: The trained network (unchanged).
        inputs: Held-out input batches.
        candidates: Ranks to score, by layer name (relative to ``network``).

    Returns:
        ``{layer: {rank: distance}}``.
    """
    reference = reference_outputs(network, inputs)
    return {name: {rank: mean_distance(factored_copy(network, {name: rank}), inputs, reference) for rank in ranks}
            for name, ranks in candidates.items()}


__all__ = ["METHOD", "RANK_FRACTIONS", "Ranks", "factored_copy", "factored_shapes", "planned_copy", "rank_candidates",
           "rank_sensitivity"]
