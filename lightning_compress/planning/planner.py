"""The planner: per group, the width that costs the least accuracy while the network meets a target.

Deterministic greedy searches over candidate widths (multiples of ``round_to``): by default from the
uniform widths that meet the target, trading channels between groups while the summed sensitivity falls
(:func:`anchored_widths`); or NetAdapt-style (Yang et al., 2018) from the dense widths, repeatedly taking the
step that loses the least measured sensitivity per unit of target saved (:func:`greedy_widths`). Targets are a latency on the deployment
runtime (absolute, or relative to the dense network's), an artifact size or a MACs ratio; latency is
predicted from the measured per-layer table, calibrated on networks measured end to end
(:class:`LatencyModel`).

Example:
    >>> space = ChannelSpace({"a": 16, "b": 16}, {}, {})
    >>> sensitivity = {"a": {16: 0.0, 8: 0.1}, "b": {16: 0.0, 8: 0.5}}
    >>> cost = lambda widths: sum(widths.values()) / 32
    >>> greedy_widths(space, sensitivity, cost, budget=0.75, round_to=8)
    {'a': 8, 'b': 16}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.core.executorch import pte_bytes
from lightning_compress.core.onnx import onnx_bytes
from lightning_compress.planning.latency import LatencyTable, LayerShape
from lightning_compress.planning.ranks import Ranks, factored_shapes
from lightning_compress.planning.widths import ChannelSpace

TARGET_KINDS = ("latency_ms", "latency_ratio", "size_kb", "macs_ratio")
"""What a plan can be asked to meet: milliseconds on the runtime, a fraction of the dense network's
latency, kilobytes of weights as shipped (int8: one byte each, fp32: four), a fraction of the dense MACs."""

Widths = dict[str, int]


@dataclass(frozen=True)
class Target:
    """One target: its kind (one of :data:`TARGET_KINDS`) and value.

    Example:
        >>> Target.from_arguments(latency_ms=None, latency_ratio=0.5, size_kb=None, macs_ratio=None)
        Target(kind='latency_ratio', value=0.5)
    """

    kind: str
    value: float

    @classmethod
    def from_arguments(cls, **arguments: float | None) -> Target:
        """The one target among ``arguments`` that is not ``None``; ``ValueError`` naming them otherwise."""
        given = {name: value for name, value in arguments.items() if value is not None}
        if len(given) != 1:
            raise ValueError(f"give exactly one target of {', '.join(arguments)}, got {given or 'none'}")
        (kind, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise ValueError(f"{kind} must be a positive number, got {value!r}")
        if kind.endswith("_ratio") and not value < 1.0:
            raise ValueError(f"{kind} must be in (0, 1), got {value!r}")
        return cls(kind, float(value))

    @property
    def unit(self) -> str:
        """How its values print."""
        return {"latency_ms": "ms", "size_kb": "kB"}.get(self.kind, "x dense")


def runtime_program(network: nn.Module, example: torch.Tensor, int8: bool, runtime: str,
                    calibration: Sequence[torch.Tensor] = (), engine: str | None = None) -> bytes:
    """``network`` as the runtime loads it: its ONNX export, or for ``int8`` the QDQ ONNX model ``engine`` ships
    (ranges calibrated on ``calibration`` batches, else on ``example``); for ``"executorch"`` its XNNPACK program,
    or for ``int8`` the program the ``xnnpack`` engine ships.

    Args:
        network: The float network (unchanged).
        example: An input batch to export with.
        int8: Build the int8 model.
        runtime: One of :data:`~lightning_compress.planning.latency.RUNTIMES`.
        calibration: Batches for the int8 model's ranges.
        engine: The int8 model's engine on onnxruntime (one of its ONNX engines; default ``"onnxruntime"``).

    Returns:
        The serialized model (ONNX or ``.pte`` bytes).
    """
    executorch = runtime == "executorch"
    if int8:
        from lightning_compress.quantization import quantize_static

        # built to be timed: not checked against its fake-quant model (a randomly initialized narrow network's
        # near-constant logits are reordered by any kernel's rounding)
        return quantize_static(network, [(batch,) for batch in (calibration or [example])],
                               engine="xnnpack" if executorch else engine or "onnxruntime", check=False).program_bytes()
    return pte_bytes(network, example) if executorch else onnx_bytes(network, example)


@dataclass
class LatencyModel:
    """Predicted latency: the sum of the layers' table latencies mapped to end-to-end milliseconds.

    The table times each convolution and linear layer alone; :meth:`calibrate` maps its sum to the latency of
    whole networks measured end to end (the dense one, the narrowest candidate and the uniform widths meeting the
    target), piecewise linearly through those points, which absorbs what the table leaves out (additions,
    activations, pooling, requantization between int8 layers, the call itself) and how that share changes with
    width: one line through the dense and the narrowest network under-predicts the widths in between.

    Args:
        table: The per-layer table.
        int8: Use the int8 latencies.
        knots: ``(table sum, measured ms)`` points the prediction passes through, by table sum; one point: the
            table's milliseconds shifted through it. Empty: the table sum itself.
        baseline_ms: Milliseconds of the network a latency ratio is of, when that is not a network this model
            predicts (an int8 plan's ratio is of the fp32 dense network), measured in the calibration's rounds.
    """

    table: LatencyTable
    int8: bool
    knots: list[tuple[float, float]] = field(default_factory=list)
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    baseline_ms: float | None = None

    def layers_ms(self, shapes: Mapping[str, LayerShape]) -> float:
        """The table sum for these layer shapes."""
        return self.table.network_ms(shapes, self.int8)

    def predict(self, shapes: Mapping[str, LayerShape]) -> float:
        """Predicted milliseconds of a network with these layer shapes."""
        return self.predict_sum(self.layers_ms(shapes))

    def predict_sum(self, layers_ms: float) -> float:
        """Predicted milliseconds of a network whose layers' table latencies sum to ``layers_ms``: linear between
        the two knots around it, the outer segments extended beyond them."""
        if len(self.knots) < 2:
            x, y = self.knots[0] if self.knots else (0.0, 0.0)
            return layers_ms - x + y
        segment = next((i for i in range(1, len(self.knots) - 1) if layers_ms < self.knots[i][0]),
                       len(self.knots) - 1)
        (x0, y0), (x1, y1) = self.knots[segment - 1], self.knots[segment]
        return y0 + (layers_ms - x0) * (y1 - y0) / (x1 - x0)

    def calibrate(self, references: Mapping[str, tuple[Mapping[str, LayerShape], float]]) -> None:
        """Pass the prediction through ``{name: (layer shapes, measured ms)}`` references.

        A reference whose measurement does not grow with the table sum beside its neighbours (only noise gives
        that) is left out, the inner ones first; the two outer ones left disagreeing are replaced by their mean
        (the table's milliseconds shifted through it).

        Example:
            >>> class Table:  # a stand-in for a measured table: 0.01 ms per output channel
            ...     def network_ms(self, shapes, int8):
            ...         return sum(0.01 * shape.out_channels for shape in shapes.values())
            >>> def conv(channels):
            ...     return {"c": LayerShape("conv", 3, channels, (1, 1), (1, 1), (0, 0), (1, 1), 1, (1, 1))}
            >>> model = LatencyModel(Table(), int8=False)
            >>> model.calibrate({"dense": (conv(100), 1.6), "narrowest": (conv(50), 0.9), "uniform": (conv(70), 1.3)})
            >>> round(model.predict(conv(60)), 4), round(model.predict(conv(85)), 4)
            (1.1, 1.45)
        """
        points = [(self.layers_ms(shapes), measured, name) for name, (shapes, measured) in references.items()]
        self.references = {name: {"layers_ms": x, "measured_ms": y} for x, y, name in points}
        knots = sorted((x, y) for x, y, _ in points)
        while len(knots) > 2 and (bad := next((i for i in range(1, len(knots)) if not (
                knots[i][0] > knots[i - 1][0] and knots[i][1] > knots[i - 1][1])), None)) is not None:
            del knots[min(max(bad, 1), len(knots) - 2)]  # an inner knot of the segment that does not grow
        if len(knots) == 2 and not (knots[1][0] > knots[0][0] and knots[1][1] > knots[0][1]):
            knots = [(sum(x for x, _ in knots) / 2, sum(y for _, y in knots) / 2)]
        self.knots = knots

    def describe(self) -> dict[str, Any]:
        """The calibration as plain data: its references, knots and baseline."""
        return {"references": self.references, "knots": [list(knot) for knot in self.knots],
                "baseline_ms": self.baseline_ms}


def target_cost(target: Target, space: ChannelSpace, latency: LatencyModel | None, int8: bool,
                ranks: Mapping[str, int] | None = None) -> Callable[[Widths], float]:
    """The function of group widths that ``target`` bounds, in the target's own units.

    ``latency_ratio`` and ``macs_ratio`` are relative to the dense widths (a latency ratio to the fp32 dense
    network's :attr:`LatencyModel.baseline_ms` when the model has one); latency targets need ``latency``, and
    follow it when it is calibrated again. With ``ranks``, those layers are costed factorized
    (:func:`~lightning_compress.planning.ranks.factored_shapes`); the dense reference stays unfactorized.
    """
    def shapes(widths: Widths, ranked: Mapping[str, int] | None = ranks) -> dict[str, LayerShape]:
        return factored_shapes(space.shapes(widths), ranked or {})

    def macs(widths: Widths, ranked: Mapping[str, int] | None = ranks) -> float:
        return float(sum(shape.macs() for shape in shapes(widths, ranked).values()))

    dense = dict(space.widths)
    if target.kind == "macs_ratio":
        total = macs(dense, None)
        return lambda widths: macs(widths) / total
    if target.kind == "size_kb":
        per_weight = 1 if int8 else 4
        return lambda widths: sum(s.parameters() for s in shapes(widths).values()) * per_weight / 1024
    if latency is None:
        raise ValueError(f"a {target.kind} target needs a latency model")
    if target.kind == "latency_ms":
        return lambda widths: latency.predict(shapes(widths))
    dense_layers_ms = latency.layers_ms(space.shapes(dense))  # the reference follows every calibration
    return lambda widths: latency.predict(shapes(widths)) / (latency.baseline_ms or
                                                             latency.predict_sum(dense_layers_ms))


class UnreachableTargetError(ValueError):
    """No candidate widths meet the target; the message names the closest reachable value."""


def narrowest_widths(space: ChannelSpace, round_to: int) -> Widths:
    """Every group at its narrowest candidate width."""
    return {group: space.candidates(group, round_to)[-1] for group in space.widths}


FLOOR_TOLERANCE = 0.02
"""A narrower width level is kept while the table predicts it within this fraction of the fastest level."""


def fastest_floor(space: ChannelSpace, latency: LatencyModel, round_to: int) -> int:
    """The narrowest width level worth planning with: every group capped at a level (a multiple of ``round_to``;
    above the space's :attr:`~lightning_compress.planning.widths.ChannelSpace.block`, of the block), the table sum
    is taken per level, and levels below the narrowest one within :data:`FLOOR_TOLERANCE` of the fastest are
    dropped, since a runtime's kernels need not get faster as channels shrink (onnxruntime's int8
    convolution runs 8 channels slower than 16).

    Args:
        space: The channel space.
        latency: The latency model (its per-layer table).
        round_to: Width levels are multiples of this.

    Returns:
        The floor for :attr:`~lightning_compress.planning.widths.ChannelSpace.floor`.
    """
    levels = [level for level in range(round_to, max(space.widths.values()) + 1, round_to) if space.fits_block(level)]
    sums = {level: latency.layers_ms(space.shapes({group: min(dense, level) for group, dense in space.widths.items()}))
            for level in levels}
    fastest = min(sums.values())
    return min(level for level, value in sums.items() if value <= fastest * (1 + FLOOR_TOLERANCE))


def reachable_narrowest(space: ChannelSpace, cost: Callable[[Widths], float], budget: float, round_to: int) -> Widths:
    """The narrowest widths, after checking that they meet ``budget``.

    Raises:
        UnreachableTargetError: If even they cost more than ``budget`` (the message names what they reach).
    """
    narrowest = narrowest_widths(space, round_to)
    closest = cost(narrowest)
    if closest > budget:
        raise UnreachableTargetError(f"the target {budget:.4g} cannot be reached by removing channels: the "
                                     f"narrowest candidate network (every group at "
                                     f"{max(round_to, space.floor)} channels or its narrowest) reaches "
                                     f"{closest:.4g}")
    return narrowest


def greedy_widths(space: ChannelSpace, sensitivity: Mapping[str, Mapping[int, float]],
                  cost: Callable[[Widths], float], budget: float, round_to: int) -> Widths:
    """Greedy NetAdapt-style search: the widths whose ``cost`` is at most ``budget``, losing the least sensitivity.

    Each step narrows one group to one of its narrower candidates: the step adding the least sensitivity per
    unit of cost saved (ties: the first group name in sorted order, then the widest candidate). A step may
    skip candidates, since a narrower layer is not always faster (kernels run fastest at some widths);
    steps that save nothing are never taken.

    Args:
        space: The network's groups and candidates.
        sensitivity: ``{group: {width: cost in accuracy terms}}`` (:func:`~lightning_compress.planning.widths.width_sensitivity`).
        cost: What the target bounds (:func:`target_cost`).
        budget: The target value.
        round_to: Candidate widths are multiples of it.

    Returns:
        The widths, by group.

    Raises:
        UnreachableTargetError: If even the narrowest widths cost more than ``budget``.
    """
    narrowest = reachable_narrowest(space, cost, budget, round_to)
    widths, current = dict(space.widths), cost(dict(space.widths))
    while current > budget:
        best: tuple[float, str, int, float] | None = None
        for group in sorted(widths):
            candidates = space.candidates(group, round_to)
            for narrower in candidates[candidates.index(widths[group]) + 1:]:
                trial = cost({**widths, group: narrower})
                saved = current - trial
                if saved <= 0:
                    continue
                lost = max(sensitivity[group][narrower] - sensitivity[group][widths[group]], 0.0)
                if best is None or lost / saved < best[0]:
                    best = (lost / saved, group, narrower, trial)
        if best is None:  # no single step saves anything any more (measurement noise): take the narrowest
            return narrowest
        _, group, narrower, current = best
        widths[group] = narrower
    return widths


ALLOCATIONS = ("sensitivity", "uniform", "greedy")
"""How a plan spreads the removal over the groups: ``sensitivity`` trades channels between groups by measured
sensitivity around the uniform widths (:func:`anchored_widths`); ``uniform`` keeps one fraction for every group
(:func:`uniform_widths`, the baseline at the same measured target); ``greedy`` narrows from the dense widths by
sensitivity alone (:func:`greedy_widths`), which can leave a group at a few channels."""


def uniform_widths(space: ChannelSpace, cost: Callable[[Widths], float], budget: float, round_to: int,
                   steps: int = 200) -> Widths:
    """One kept fraction for every group, the largest whose ``cost`` is at most ``budget``.

    Each group keeps the candidate width nearest to ``fraction * dense width`` (ties: the wider), so every group
    shrinks alike, as ``ChannelPruning(channel_ratio=...)`` does; fractions are tried from 1 down in ``steps``.

    Args:
        space: The network's groups and candidates.
        cost: What the target bounds (:func:`target_cost`).
        budget: The target value.
        round_to: Candidate widths are multiples of it.
        steps: Fractions tried (1, 1 - 1/steps, ...).

    Returns:
        The widths, by group.

    Raises:
        UnreachableTargetError: If even the narrowest widths cost more than ``budget``.

    Example:
        >>> space = ChannelSpace({"a": 16, "b": 32}, {}, {})
        >>> uniform_widths(space, lambda widths: sum(widths.values()) / 48, budget=0.5, round_to=8)
        {'a': 8, 'b': 16}
    """
    narrowest = reachable_narrowest(space, cost, budget, round_to)
    for step in range(steps, 0, -1):
        fraction = step / steps
        widths = {group: min(space.candidates(group, round_to), key=lambda w: (abs(w - fraction * dense), -w))
                  for group, dense in space.widths.items()}
        if cost(widths) <= budget:
            return widths
    return narrowest


def anchored_widths(space: ChannelSpace, sensitivity: Mapping[str, Mapping[int, float]],
                    cost: Callable[[Widths], float], budget: float, round_to: int, spread: float = 2.0) -> Widths:
    """Widths by sensitivity near the uniform ones: from :func:`uniform_widths`, trade channels between groups.

    Each step widens one group by one candidate and, unless the budget's slack pays for it, narrows another to its
    widest candidate that keeps ``cost`` within ``budget``: the step lowering the summed sensitivity most (ties:
    group names in sorted order). Every group stays within ``spread`` times its uniform width either way, so no
    group becomes a bottleneck that sensitivity measured without retraining does not see (the free search,
    :func:`greedy_widths`, planned ResNet-20 layers down to 8 channels and trained below uniform).

    Args:
        space: The network's groups and candidates.
        sensitivity: ``{group: {width: cost in accuracy terms}}``.
        cost: What the target bounds (:func:`target_cost`).
        budget: The target value.
        round_to: Candidate widths are multiples of it.
        spread: How far from its uniform width a group may move (a factor).

    Returns:
        The widths, by group: the uniform ones when no trade lowers the summed sensitivity.

    Raises:
        UnreachableTargetError: If even the narrowest widths cost more than ``budget``.

    Example:
        >>> space = ChannelSpace({"a": 32, "b": 32}, {}, {})
        >>> sensitivity = {g: {32: 0.0, 24: s, 16: 2 * s, 8: 4 * s} for g, s in (("a", 0.1), ("b", 1.0))}
        >>> anchored_widths(space, sensitivity, lambda widths: sum(widths.values()) / 64, budget=0.5, round_to=8)
        {'a': 8, 'b': 24}
    """
    widths = uniform_widths(space, cost, budget, round_to)
    allowed = {group: [w for w in space.candidates(group, round_to) if width / spread <= w <= width * spread]
               for group, width in widths.items()}

    def summed(trial: Widths) -> float:
        return sum(sensitivity[group][width] for group, width in trial.items())

    while True:
        best: tuple[float, Widths] | None = None
        current = summed(widths)
        for wider in sorted(widths):
            index = allowed[wider].index(widths[wider])
            if index == 0:
                continue
            widened = {**widths, wider: allowed[wider][index - 1]}
            if cost(widened) <= budget:
                trials = [widened]
            else:  # per other group, its widest narrower width that pays for the widening
                trials = [next((trial for width in allowed[narrower][allowed[narrower].index(widths[narrower]) + 1:]
                                if cost(trial := {**widened, narrower: width}) <= budget), None)
                          for narrower in sorted(set(widths) - {wider})]
            for trial in filter(None, trials):
                gain = current - summed(trial)
                if gain > 1e-12 and (best is None or gain > best[0]):
                    best = (gain, trial)
        if best is None:
            return widths
        widths = best[1]


def factorized_plan(sensitivity: Mapping[str, Mapping[int, float]],
                    rank_costs: Mapping[str, Mapping[int, float]], cost_of: Callable[[Ranks], Callable[[Widths], float]],
                    search: Callable[[Callable[[Widths], float]], Widths], trials: int = 4) -> tuple[Widths, Ranks]:
    """Widths and Tucker-2 ranks: factorize one more layer at a time while the plan meeting the budget loses less.

    From the widths ``search`` plans without factorization, each round ranks every layer's candidate ranks by the
    sensitivity they add per unit of cost they save at the current widths, plans the widths again for the
    ``trials`` best (what a factorization saves lets groups keep channels) and keeps the one whose summed
    sensitivity (widths' and ranks', one scale) is lowest, if lower than the current plan's; it stops when none is.

    Args:
        sensitivity: ``{group: {width: output distance}}``.
        rank_costs: ``{layer: {rank: output distance}}`` (:func:`~lightning_compress.planning.ranks.rank_sensitivity`).
        cost_of: The target's cost function of the widths with these ranks factorized (:func:`target_cost`).
        search: Widths meeting the target under a cost function (raises :class:`UnreachableTargetError`).
        trials: Candidates planned in full per round.

    Returns:
        ``(widths, ranks)``.

    Example:
        >>> space = ChannelSpace({"a": 16}, {}, {})
        >>> cost_of = lambda ranks: lambda widths: widths["a"] / 16 - (0.45 if ranks else 0.0)
        >>> search = lambda cost: uniform_widths(space, cost, 0.6, 8)
        >>> factorized_plan({"a": {16: 0.0, 8: 1.0}}, {"conv": {4: 0.1}}, cost_of, search)
        ({'a': 16}, {'conv': 4})
    """
    def summed(widths: Widths, ranks: Ranks) -> float:
        return (sum(sensitivity[group][width] for group, width in widths.items())
                + sum(rank_costs[layer][rank] for layer, rank in ranks.items()))

    ranks: Ranks = {}
    widths = search(cost_of(ranks))
    total = summed(widths, ranks)
    while True:
        current = cost_of(ranks)(widths)
        scored = []
        for layer in sorted(set(rank_costs) - set(ranks)):
            for rank, lost in sorted(rank_costs[layer].items()):
                saved = current - cost_of({**ranks, layer: rank})(widths)
                if saved > 0:
                    scored.append((max(lost, 0.0) / saved, layer, rank))
        chosen = None
        for _, layer, rank in sorted(scored)[:trials]:
            trial = {**ranks, layer: rank}
            try:
                trial_widths = search(cost_of(trial))
            except UnreachableTargetError:
                continue
            if (trial_total := summed(trial_widths, trial)) < total:
                total, chosen = trial_total, (trial_widths, trial)
        if chosen is None:
            return widths, ranks
        widths, ranks = chosen


@dataclass
class Plan:
    """A plan: the widths per group and what they are predicted to cost.

    Args:
        target: What was asked.
        int8: Whether the shipped network is int8.
        widths: Kept channels per group (root layer name relative to the network).
        dense_widths: The dense channels per group.
        predicted: The plan's predicted value of the target's measure.
        dense: The dense network's value of the same measure.
        sensitivity: The summed sensitivity of the chosen widths and ranks (output distance, lower is better).
        details: Latency model and table facts, for reports.
        ranks: Tucker-2 rank per factorized layer (relative to the network; applied after the widths).
    """

    target: Target
    int8: bool
    widths: Widths
    dense_widths: Widths
    predicted: float
    dense: float
    sensitivity: float
    details: dict[str, Any] = field(default_factory=dict)
    ranks: Ranks = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON, checkpoints)."""
        return {"target": {"kind": self.target.kind, "value": self.target.value}, "int8": self.int8,
                "widths": dict(self.widths), "dense_widths": dict(self.dense_widths), "predicted": self.predicted,
                "dense": self.dense, "sensitivity": self.sensitivity, "details": self.details,
                "ranks": dict(self.ranks)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """The inverse of :meth:`as_dict`."""
        return cls(Target(data["target"]["kind"], float(data["target"]["value"])), bool(data["int8"]),
                   {k: int(v) for k, v in data["widths"].items()}, {k: int(v) for k, v in data["dense_widths"].items()},
                   float(data["predicted"]), float(data["dense"]), float(data["sensitivity"]), dict(data["details"]),
                   {k: int(v) for k, v in data.get("ranks", {}).items()})

    def render(self) -> str:
        """The per-group plan as a markdown table, with the prediction."""
        unit = self.target.unit
        uniform = ", one fraction for every group" if self.details.get("allocation") == "uniform" else ""
        lines = [(f"target {self.target.kind} = {self.target.value:g} {unit} ({'int8' if self.int8 else 'fp32'}{uniform}); "
                  f"predicted {self.predicted:.4g} {unit}, dense {self.dense:.4g} {unit}"), "",
                 "| group | dense channels | planned channels |", "|---|---:|---:|"]
        lines += [f"| {group} | {self.dense_widths[group]} | {width} |" for group, width in self.widths.items()]
        if self.ranks:
            lines += ["", "| factorized layer (Tucker-2) | rank |", "|---|---:|"]
            lines += [f"| {layer} | {rank} |" for layer, rank in self.ranks.items()]
        return "\n".join(lines)
