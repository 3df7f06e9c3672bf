"""A network's channel widths as planning variables: which layer shapes each coupled group decides.

:func:`channel_space` traces the network once with torch-pruning's dependency graph (through
:mod:`~lightning_compress.pruning.slimming`, as ``ChannelPruning`` does), removes one channel of each group
in turn from a copy and notes which layers' input and output channels moved, so any assignment of group
widths maps to every layer's shape without tracing again. :func:`width_sensitivity` measures, for each group
alone, how far the network's outputs move from the dense ones when the group is cut to each candidate width
(its least important channels removed, as ``ChannelPruning`` would remove them; batch-norm statistics
re-estimated on the same inputs before scoring, :func:`reestimate_norms`).

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
    >>> space = channel_space(net, torch.randn(1, 3, 8, 8), ignored=["2"])
    >>> space.widths, space.candidates("0", round_to=8)
    ({'0': 16}, [16, 8])
    >>> space.shapes({"0": 8})["2"].in_channels
    8
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress.core.accounting import eval_mode
from lightning_compress.planning.latency import LayerShape, layer_shapes
from lightning_compress.pruning.importance import ImportanceLike, resolve_importance
from lightning_compress.pruning.slimming import (
    group_channels,
    prunable_groups,
    remove_channels,
    trace_dependencies,
)


@dataclass(frozen=True)
class ChannelSpace:
    """The dense widths of a network's prunable groups and the layer channels each one sets.

    Args:
        widths: Dense channels of each group, by root layer name (relative to the network).
        layers: Dense shape of every ``Conv2d``/``Linear``.
        moves: Per group, ``(layer, "in" | "out", channels per group channel)`` for every layer it resizes.
        floor: No candidate below this width (but a group's dense width): narrower layers that the runtime runs
            no faster (:func:`~lightning_compress.planning.planner.fastest_floor`).
        block: Above this width, only its multiples are candidates (0: no such rule): the runtime's channel
            block, where a width between two multiples runs no faster than the next one up
            (:func:`~lightning_compress.planning.latency.channel_block`).
    """

    widths: dict[str, int]
    layers: dict[str, LayerShape]
    moves: dict[str, list[tuple[str, str, int]]]
    floor: int = 0
    block: int = 0

    def candidates(self, group: str, round_to: int) -> list[int]:
        """The widths a group may keep, widest first: its dense width, then the multiples of ``round_to`` below
        down to :attr:`floor`, above :attr:`block` only its multiples.

        Example:
            >>> space = ChannelSpace({"a": 20, "b": 64}, {}, {})
            >>> space.candidates("a", 8), replace(space, floor=16).candidates("a", 8)
            ([20, 16, 8], [20, 16])
            >>> replace(space, block=16).candidates("b", 8)
            [64, 48, 32, 16, 8]
        """
        dense = self.widths[group]
        return [dense] + [w for w in range((dense - 1) // round_to * round_to, 0, -round_to)
                          if w >= self.floor and self.fits_block(w)]

    def fits_block(self, width: int) -> bool:
        """Whether ``width`` keeps the :attr:`block` rule: no block, at most one block, or a multiple of it.

        Example:
            >>> [ChannelSpace({}, {}, {}, block=16).fits_block(w) for w in (8, 24, 32)]
            [True, False, True]
        """
        return not self.block or width <= self.block or width % self.block == 0

    def shapes(self, widths: Mapping[str, int]) -> dict[str, LayerShape]:
        """Every layer's shape when the groups keep ``widths`` (groups not named stay dense)."""
        change = {name: [0, 0] for name in self.layers}
        for group, width in widths.items():
            for layer, side, per_channel in self.moves[group]:
                change[layer][side == "out"] += (self.widths[group] - width) * per_channel
        shapes = {}
        for name, dense in self.layers.items():
            fewer_in, fewer_out = change[name]
            depthwise = dense.groups > 1 and dense.groups == dense.in_channels
            in_channels = dense.in_channels - fewer_in
            shapes[name] = replace(dense, in_channels=in_channels, out_channels=dense.out_channels - fewer_out,
                                   groups=in_channels if depthwise else dense.groups)
        return shapes


def channel_space(network: nn.Module, example: torch.Tensor, ignored: Sequence[str] = ()) -> ChannelSpace:
    """Trace ``network`` and find which layer channels each prunable group sets (``network`` is unchanged).

    Args:
        network: The network.
        example: An input batch (one image suffices).
        ignored: Layers (relative to ``network``) whose output channels stay, as ``ChannelPruning``'s.

    Returns:
        The :class:`ChannelSpace`.
    """
    clone = copy.deepcopy(network)
    graph = trace_dependencies(clone, example)
    groups = prunable_groups(graph, [clone.get_submodule(name) for name in ignored])
    widths = {name: group_channels(group) for name, group in groups.items()}
    dense = before = layer_shapes(clone, example)
    moves: dict[str, list[tuple[str, str, int]]] = {}
    for name, width in widths.items():
        moves[name] = []
        if width < 2:
            continue
        remove_channels(graph, {name: [0]})
        after = layer_shapes(clone, example)
        for layer, shape in after.items():
            for side, old, new in (("in", before[layer].in_channels, shape.in_channels),
                                   ("out", before[layer].out_channels, shape.out_channels)):
                if new != old:
                    moves[name].append((layer, side, old - new))
        before = after
    return ChannelSpace(widths, dense, moves)


def output_distance(reference: torch.Tensor, output: torch.Tensor) -> float:
    """How far ``output`` is from ``reference``: KL divergence of the softmaxes for logits ``(N, classes)``,
    else the mean squared error relative to the reference's mean square.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0]])
        >>> output_distance(logits, logits), round(output_distance(logits, torch.tensor([[0.0, 2.0]])), 3)
        (0.0, 1.523)
    """
    reference, output = reference.float(), output.float()
    if reference.dim() == 2:
        return float(F.kl_div(F.log_softmax(output, 1), F.log_softmax(reference, 1), log_target=True,
                              reduction="batchmean").clamp_min(0.0))
    return float(F.mse_loss(output, reference) / reference.pow(2).mean().clamp_min(1e-12))


def width_sensitivity(network: nn.Module, inputs: Sequence[torch.Tensor], space: ChannelSpace, round_to: int,
                      importance: ImportanceLike = "l1") -> dict[str, dict[int, float]]:
    """Per group and candidate width: the output distance from the dense network when that group alone keeps
    that width (its least important channels by ``importance`` removed, then batch-norm statistics re-estimated on
    ``inputs``, as for the dense reference: :func:`reestimate_norms`); ``network`` is unchanged.

    Args:
        network: The trained network.
        inputs: Held-out input batches.
        space: From :func:`channel_space` on this network.
        round_to: Candidate widths are multiples of it (:meth:`ChannelSpace.candidates`).
        importance: ``ChannelPruning``'s criterion (gradient-free ones: ``"l1"``, ``"l2"``, ``"bn_scale"``).

    Returns:
        ``{group: {width: distance}}``, the dense width at 0.
    """
    criterion = resolve_importance(importance)
    reference = reference_outputs(network, inputs)
    costs: dict[str, dict[int, float]] = {}
    for name, dense in space.widths.items():
        clone = copy.deepcopy(network)
        graph = trace_dependencies(clone, inputs[0][:1])
        costs[name] = {dense: 0.0}
        for width in space.candidates(name, round_to)[1:]:
            group = prunable_groups(graph, [])[name]
            current = group_channels(group)
            scores = criterion(group)
            remove_channels(graph, {name: torch.argsort(scores.float(), stable=True)[:current - width].tolist()})
            costs[name][width] = mean_distance(clone, inputs, reference)
    return costs


def reference_outputs(network: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs a cut network is scored against: a copy of ``network``'s, its batch-norm statistics re-estimated
    on ``inputs`` (:func:`reestimate_norms`), as every scored network's are."""
    dense = copy.deepcopy(network)
    reestimate_norms(dense, inputs)
    with eval_mode(dense), torch.no_grad():
        return [dense(batch) for batch in inputs]


def mean_distance(network: nn.Module, inputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Mean :func:`output_distance` of ``network`` (its batch-norm statistics re-estimated on ``inputs``, in place)
    from ``reference`` over ``inputs``."""
    reestimate_norms(network, inputs)
    with eval_mode(network), torch.no_grad():
        distances = [output_distance(ref, network(batch)) for ref, batch in zip(reference, inputs)]
    return sum(distances) / len(distances)


def reestimate_norms(network: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """Replace every batch-norm's running statistics by their plain average over ``inputs`` (forward passes with
    only the norms in training mode), in place.

    A network scored right after channels are cut carries statistics of channels that are gone, which ranks cuts
    unlike their accuracy after fine-tuning; scored with re-estimated statistics it ranks them alike (adaptive
    batch normalization, EagleEye: Li et al., 2020). Dense and cut networks are scored the same way.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        >>> reestimate_norms(net, [torch.full((2, 3, 4, 4), 2.0)])
        >>> bool(net[1].running_var.max() < 1e-3), net[1].momentum
        (True, 0.1)
    """
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    with eval_mode(network), torch.no_grad():
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
            norm.train()
        for batch in inputs:
            network(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def slimmed_copy(network: nn.Module, example: torch.Tensor, widths: Mapping[str, int],
                 importance: ImportanceLike = "l1") -> nn.Module:
    """A copy of ``network`` whose groups keep ``widths`` (their most important channels); ``network`` is unchanged.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
        >>> slimmed_copy(net, torch.randn(1, 3, 8, 8), {"0": 8})[2].in_channels
        8
    """
    criterion = resolve_importance(importance)
    clone = copy.deepcopy(network)
    graph = trace_dependencies(clone, example)
    groups = prunable_groups(graph, [])
    plan = {}
    for name, width in widths.items():
        excess = group_channels(groups[name]) - width
        if excess > 0:
            plan[name] = torch.argsort(criterion(groups[name]).float(), stable=True)[:excess].tolist()
    remove_channels(graph, plan)
    return clone
