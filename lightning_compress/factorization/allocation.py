"""Choosing each layer's rank, by a MACs budget or by kept energy (pure functions).

Each layer is a :class:`LayerOptions`: its dense MACs and, per allowed rank, the MACs of its block
and the relative squared reconstruction error ``‖W − Ŵ‖² / ‖W‖²``. A layer that no allowed rank
makes cheaper than dense stays dense.

Example:
    >>> big = LayerOptions("big", dense_macs=100, options=[Option(8, 60, 0.01), Option(4, 30, 0.05)])
    >>> small = LayerOptions("small", dense_macs=10, options=[Option(2, 5, 0.2)])
    >>> allocate_by_macs([big, small], fixed_macs=0, budget_macs=80)
    {'big': 8}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One allowed rank of a layer: the block's MACs per sample and the relative squared error, in [0, 1]."""

    rank: int
    macs: int
    error: float


@dataclass(frozen=True)
class LayerOptions:
    """A layer's qualified name, dense MACs per sample and allowed ranks (any order)."""

    name: str
    dense_macs: int
    options: Sequence[Option]


def candidate_ranks(full: int, round_to: int = 1) -> list[int]:
    """The ranks a layer may take: multiples of ``round_to`` below ``full``, and ``full`` itself, increasing.

    Example:
        >>> candidate_ranks(20, 8), candidate_ranks(5), candidate_ranks(6, 8)
        ([8, 16, 20], [1, 2, 3, 4, 5], [6])
    """
    return sorted({*range(round_to, full, round_to), full})


def _best_move(layer: LayerOptions, macs: int, error: float) -> tuple[float, Option] | None:
    """The cheaper option of ``layer`` adding the least error per MAC saved, from its current cost."""
    moves = [((o.error - error) / (macs - o.macs), o) for o in layer.options if o.macs < macs]
    return min(moves, key=lambda move: (move[0], move[1].macs), default=None)


def allocate_by_macs(layers: Sequence[LayerOptions], fixed_macs: int, budget_macs: float) -> dict[str, int]:
    """``{layer name: rank}`` that bring the network within ``budget_macs`` at the least error.

    Greedy: repeatedly move the layer whose next cheaper option adds the least ``Δerror / ΔMACs``; the
    MACs the last move left under budget are spent back where they remove the most error. Layers not in
    the result stay dense; ``fixed_macs`` are the MACs of everything not factorizable.

    Raises:
        ValueError: If the cheapest option of every layer still exceeds the budget (naming the minimum).

    Example:
        >>> layer = LayerOptions("conv", 100, [Option(1, 20, 0.5), Option(2, 40, 0.1)])
        >>> allocate_by_macs([layer], fixed_macs=50, budget_macs=100)
        {'conv': 2}
    """
    cheapest = fixed_macs + sum(min([layer.dense_macs, *(o.macs for o in layer.options)]) for layer in layers)
    if cheapest > budget_macs:
        raise ValueError(f"the MACs target is unreachable: {budget_macs:.0f} MACs wanted, but the smallest "
                         f"ranks still leave {cheapest} (of which {fixed_macs} in layers not factorized)")
    by_name = {layer.name: layer for layer in layers}
    current: dict[str, tuple[int, float, int | None]] = {layer.name: (layer.dense_macs, 0.0, None) for layer in layers}
    moves = {layer.name: _best_move(layer, layer.dense_macs, 0.0) for layer in layers}
    total = fixed_macs + sum(layer.dense_macs for layer in layers)
    while total > budget_macs:
        name = min((n for n in moves if moves[n] is not None), key=lambda n: moves[n][0])
        option = moves[name][1]
        total -= current[name][0] - option.macs
        current[name] = (option.macs, option.error, option.rank)
        moves[name] = _best_move(by_name[name], option.macs, option.error)
    _spend_slack(layers, current, budget_macs - total)
    return {name: rank for name, (_, _, rank) in current.items() if rank is not None}


def _spend_slack(layers: Sequence[LayerOptions], current: dict[str, tuple[int, float, int | None]],
                 slack: float) -> None:
    """Raise ranks (or return to dense) where that removes the most error per MAC, within ``slack``."""
    while True:
        best: tuple[float, str, tuple[int, float, int | None]] | None = None
        for layer in layers:
            macs, error, _ = current[layer.name]
            choices = [(o.macs, o.error, o.rank) for o in layer.options] + [(layer.dense_macs, 0.0, None)]
            for choice in choices:
                added = choice[0] - macs
                if 0 < added <= slack and choice[1] < error:
                    gain = (error - choice[1]) / added
                    if best is None or gain > best[0]:
                        best = (gain, layer.name, choice)
        if best is None:
            return
        _, name, choice = best
        slack -= choice[0] - current[name][0]
        current[name] = choice


def allocate_by_energy(layers: Sequence[LayerOptions], energy: float) -> dict[str, int]:
    """Per layer, the smallest rank keeping ``energy`` (in (0, 1]) of ``‖W‖²``, if cheaper than dense.

    Example:
        >>> layer = LayerOptions("conv", 100, [Option(1, 20, 0.5), Option(2, 40, 0.1), Option(3, 120, 0.0)])
        >>> allocate_by_energy([layer], 0.9), allocate_by_energy([layer], 1.0)
        ({'conv': 2}, {})
    """
    chosen = {}
    for layer in layers:
        enough = [o for o in layer.options if o.error <= 1.0 - energy + 1e-9]
        if enough:
            option = min(enough, key=lambda o: o.rank)
            if option.macs < layer.dense_macs:
                chosen[layer.name] = option.rank
    return chosen
