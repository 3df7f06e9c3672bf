"""Planning one network to one target: the channel space, the calibrated latency model and the search, together.

:class:`TargetPlanner` is what ``CompressToTarget`` and ``lightning-compress plan`` share: built on the
dense network (tracing it, calibrating the latency model on networks measured end to end), it refuses an
unreachable target at once (:meth:`~TargetPlanner.check_reachable`), plans on a trained network and
held-out inputs (:meth:`~TargetPlanner.plan`), and measures a network end to end to check the prediction
(:meth:`~TargetPlanner.measure`).

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(256, 2))
    >>> planner = TargetPlanner(net, torch.randn(1, 3, 8, 8), Target("macs_ratio", 0.6), ignored=["4"])
    >>> plan = planner.plan(net, [torch.randn(8, 3, 8, 8)])
    >>> plan.predicted <= 0.6
    True
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lightning_compress.core.timing_lock import exclusive_timing
from lightning_compress.planning.latency import LatencyTable, channel_block, table_runtime, timed_programs
from lightning_compress.planning.planner import (
    LatencyModel,
    Plan,
    Target,
    UnreachableTargetError,
    anchored_widths,
    factorized_plan,
    fastest_floor,
    greedy_widths,
    narrowest_widths,
    runtime_program,
    target_cost,
    uniform_widths,
)
from lightning_compress.planning.ranks import (
    Ranks,
    factored_shapes,
    planned_copy,
    rank_candidates,
    rank_sensitivity,
)
from lightning_compress.planning.widths import channel_space, slimmed_copy, width_sensitivity
from lightning_compress.pruning.importance import ImportanceLike
from lightning_compress.quantization.engines import ENGINE_TABLE, INT8_WEIGHT_MAX, ONNX_ENGINES

REMEASURE_ROUNDS = 7
"""Interleaved rounds of a measurement taken again before it refuses a latency target or shrinks or grows a plan's
budget."""
GROW_BELOW = 0.95
"""A latency plan measured within its target but below this fraction of its prediction (over
:data:`REMEASURE_ROUNDS` rounds) is re-planned under a budget grown by the over-prediction (a plan left 9 % of
a ResNet-56 budget unused at 0.91 of its prediction, and trained below the uniform widths)."""
GROW_CHECKS = 3
"""Checks a plan needs left to grow: its own, the grown plan's, and the fallback's if the grown plan misses."""


def timed_engines(runtime: str) -> tuple[str, ...]:
    """The quantization engines whose int8 program a plan for ``runtime`` can time: ``xnnpack`` on ExecuTorch,
    the QDQ ONNX engines elsewhere.

    Example:
        >>> timed_engines("executorch")
        ('xnnpack',)
    """
    return ("xnnpack",) if runtime == "executorch" else ONNX_ENGINES


class TargetPlanner:
    """Plans the channel widths of one network for one target on one runtime.

    Args:
        network: The dense network (unchanged).
        example: One input sample (batch of one) as the network receives it.
        target: What the plan must meet.
        runtime: One of :data:`~lightning_compress.planning.latency.RUNTIMES` (latency targets; ExecuTorch's layers
            are costed by onnxruntime's table, calibrated on ExecuTorch programs).
        batch_size: The deployment's batch size (latency targets).
        threads: The deployment's inference threads (latency targets).
        int8: The shipped network is int8 (latency and size are those of its int8 form).
        round_to: Widths are multiples of this (``ChannelPruning``'s ``round_to``).
        ignored: Layers whose output channels stay (relative to ``network``).
        table_path: JSON file caching the per-layer latency table.
        repeats: Timed calls per measurement.
        calibration: Input batches for the int8 model's ranges (end-to-end measurements).
        engine: The int8 network's engine (latency targets: one of :func:`timed_engines`; default: the first of
            them); the latency table times its weight grid, the end-to-end checks its program.
    """

    def __init__(self, network: nn.Module, example: torch.Tensor, target: Target, runtime: str = "onnxruntime",
                 batch_size: int = 1, threads: int = 1, int8: bool = False, round_to: int = 8,
                 ignored: Sequence[str] = (), table_path: str | os.PathLike[str] | None = None, repeats: int = 50,
                 calibration: Sequence[torch.Tensor] = (), engine: str | None = None) -> None:
        self.target, self.int8, self.round_to, self.runtime = target, int8, round_to, runtime
        if engine is not None and target.kind.startswith("latency") and engine not in timed_engines(runtime):
            raise ValueError(f"engine must be one of {timed_engines(runtime)} on {runtime}, got {engine!r}")
        self.engine = engine
        self.threads, self.repeats = threads, repeats
        self.example = example[:1].detach().cpu().float()
        self.batch = self.example.expand(batch_size, *self.example.shape[1:]).contiguous()
        self.calibration = [batch.detach().cpu().float() for batch in calibration]
        network = copy.deepcopy(network).cpu().float()
        begin = time.perf_counter()
        self.space = channel_space(network, self.example, ignored)
        self.latency: LatencyModel | None = None
        self.dense_network = network
        self.narrowest_network: nn.Module | None = None
        self._references: dict[str, tuple[dict[str, int], nn.Module]] = {}
        self._programs: dict[int, bytes] = {}
        self.ratio_reference: nn.Module | bytes = network  # what a latency ratio is of, timed beside
        if target.kind.startswith("latency"):
            weight_max = ENGINE_TABLE[engine].weight_quant_max if engine else INT8_WEIGHT_MAX
            table = LatencyTable(table_runtime(runtime), batch_size, threads, table_path, repeats, weight_max)
            self.latency = LatencyModel(table, int8)
            if int8:  # an int8 plan's ratio is of the network the user starts from: the fp32 dense one
                self.ratio_reference = runtime_program(copy.deepcopy(network), self.batch, False, runtime)
            with exclusive_timing():  # the table's layers and the calibration timed on a machine kept quiet
                self.space = replace(self.space, block=channel_block(runtime, int8))
                self.space = replace(self.space, floor=fastest_floor(self.space, self.latency, round_to))
                narrowest = narrowest_widths(self.space, round_to)
                self.narrowest_network = slimmed_copy(network, self.example, narrowest)
                self._references = {"dense": (dict(self.space.widths), network),
                                    "narrowest": (narrowest, self.narrowest_network)}
                self._calibrate(rounds=3)
                self._add_uniform_reference(network)
            table.save()
        self.cost = target_cost(target, self.space, self.latency, int8)
        self.setup_seconds = time.perf_counter() - begin

    def _calibrate(self, rounds: int) -> None:
        """Fit the latency model to the reference networks measured end to end, in interleaved rounds (an int8
        plan's fp32 dense network in the same rounds: the baseline of its latency ratio)."""
        networks: dict[str, nn.Module | bytes] = {name: net for name, (_, net) in self._references.items()}
        if self.int8:
            networks["dense_fp32"] = self.ratio_reference
        measured = self.measure(rounds, **networks)
        self.latency.baseline_ms = measured.get("dense_fp32")
        self.latency.calibrate({name: (self.space.shapes(widths), measured[name])
                                for name, (widths, _) in self._references.items()})

    def _add_uniform_reference(self, network: nn.Module) -> None:
        """Calibrate again with a third network: the uniform widths the first calibration predicts to meet the
        target, so the prediction passes through a measurement near the widths the plan will have (none when the
        target looks unreachable, or those widths are the dense or the narrowest ones)."""
        try:
            cost = target_cost(self.target, self.space, self.latency, self.int8)
            widths = uniform_widths(self.space, cost, self.target.value, self.round_to)
        except UnreachableTargetError:
            return
        if all(widths != known for known, _ in self._references.values()):
            self._references["uniform"] = (widths, slimmed_copy(network, self.example, widths))
            self._calibrate(rounds=3)

    @property
    def dense_value(self) -> float:
        """The dense network's value of the target measure (under the current calibration)."""
        return self.cost(dict(self.space.widths))

    def program(self, network: nn.Module | bytes) -> bytes:
        """``network`` as the runtime loads it (:func:`~lightning_compress.planning.planner.runtime_program`); the
        reference networks' programs are built once, a program given as bytes is returned as is."""
        if isinstance(network, bytes):
            return network
        if id(network) in self._programs:
            return self._programs[id(network)]
        program = runtime_program(copy.deepcopy(network).cpu().float(), self.batch, self.int8, self.runtime,
                                  self.calibration, self.engine)
        if any(network is reference for _, reference in self._references.values()):
            self._programs[id(network)] = program
        return program

    def measure(self, rounds: int = 3, **networks: nn.Module | bytes) -> dict[str, float]:
        """Milliseconds of each network (or runtime program) end to end on the runtime, at the batch size and
        threads planned for, in interleaved rounds (:func:`~lightning_compress.planning.latency.timed_programs`).

        Example:
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
            >>> planner = TargetPlanner(net, torch.randn(1, 3, 8, 8), Target("latency_ratio", 0.9), ignored=["2"],
            ...                         repeats=2)
            >>> sorted(planner.measure(1, dense=planner.dense_network, narrowest=planner.narrowest_network))
            ['dense', 'narrowest']
        """
        programs = {name: self.program(network) for name, network in networks.items()}
        return timed_programs(programs, self.runtime, self.threads, self.batch.numpy(), self.repeats, rounds)

    def closest(self) -> float:
        """The target measure of the narrowest candidate network: the most that channel removal can reach."""
        return self.cost(narrowest_widths(self.space, self.round_to))

    def check_reachable(self) -> None:
        """Raise :class:`UnreachableTargetError` (naming the closest reachable value) if the target cannot be met.

        A latency target that looks unreachable is measured again first, over more rounds: on a busy machine one
        calibration can be off by tens of percent, and a refusal stops the user's run.
        """
        closest = self.closest()
        if closest > self.target.value and self.latency is not None:
            self._calibrate(rounds=REMEASURE_ROUNDS)
            closest = self.closest()
        if closest > self.target.value:
            precision = "int8" if self.int8 else "fp32"
            raise UnreachableTargetError(
                f"{self.target.kind}={self.target.value:g} cannot be reached: the dense "
                f"{'int8 ' if self.int8 else ''}network is predicted at "
                f"{self.dense_value:.4g} {self.target.unit} and the narrowest one channel removal can give (every "
                f"group at {max(self.round_to, self.space.floor)} channels) at {closest:.4g} {self.target.unit} "
                f"({precision}"
                + (f", {self.runtime}, batch {len(self.batch)}, {self.threads} thread(s)" if self.latency else "")
                + f"); ask for {closest:.4g} {self.target.unit} or more"
                + ("" if self.int8 or self.target.kind == "macs_ratio" else ", or quantize to int8"))

    def with_target(self, target: Target) -> TargetPlanner:
        """This planner (same network, table and calibration, shared: a calibration either makes holds for both) for
        another target of the same kind family.

        Example:
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
            >>> planner = TargetPlanner(net, torch.randn(1, 3, 8, 8), Target("macs_ratio", 0.9), ignored=["2"])
            >>> planner.with_target(Target("macs_ratio", 0.6)).plan(net, [torch.randn(4, 3, 8, 8)]).predicted <= 0.6
            True
        """
        other = copy.copy(self)
        other.target, other.cost = target, target_cost(target, self.space, self.latency, self.int8)
        return other

    def plan(self, network: nn.Module, inputs: Sequence[torch.Tensor], importance: ImportanceLike = "l1",
             checks: int = 3, sensitivity: dict[str, dict[int, float]] | None = None,
             allocation: str = "sensitivity", factorize: bool = False) -> Plan:
        """The widths (and, with ``factorize``, Tucker-2 ranks) meeting the target that lose the least output
        fidelity on ``inputs``.

        A latency plan is checked end to end: the planned network is built and measured beside the dense one;
        if it misses the target, the search runs again with the budget shrunk by the miss; if it measures well
        within the target but below its prediction, with the budget grown by the over-prediction (at most
        ``checks`` measurements). Every check is in the plan's ``details["checks"]``; ``details["measured_ms"]``,
        ``details["prediction_error"]`` (in the target's unit) and ``details["met"]`` (whether it met the target)
        are the last one's.

        Args:
            network: The (trained) network, with the dense widths.
            inputs: Held-out input batches for the sensitivity.
            importance: ``ChannelPruning``'s channel criterion (gradient-free).
            checks: End-to-end measurements at most (latency targets).
            sensitivity: Already measured (:func:`~lightning_compress.planning.widths.width_sensitivity` of this
                network on these inputs): not measured again.
            allocation: One of :data:`~lightning_compress.planning.planner.ALLOCATIONS`: widths by sensitivity, or
                one fraction for every group (the plan still records its summed sensitivity, for comparison).
            factorize: Also plan Tucker-2 factorizations of ``k x k`` convolutions
                (:func:`~lightning_compress.planning.planner.factorized_plan`), each rank's sensitivity measured on
                ``inputs`` (:func:`~lightning_compress.planning.ranks.rank_sensitivity`).

        Returns:
            The :class:`~lightning_compress.planning.planner.Plan`.
        """
        self.check_reachable()
        begin = time.perf_counter()
        network = copy.deepcopy(network).cpu().float()
        batches = [x.detach().cpu().float() for x in inputs]
        if sensitivity is None:
            sensitivity = width_sensitivity(network, batches, self.space, self.round_to, importance)
        rank_costs: dict[str, dict[int, float]] = {}
        if factorize:
            candidates = {name: ranks for name, shape in self.space.layers.items()
                          if (ranks := rank_candidates(shape, self.round_to))}
            rank_costs = rank_sensitivity(network, batches, candidates)
        sensitivity_seconds = time.perf_counter() - begin

        def cost_of(ranks: Ranks) -> Callable[[dict[str, int]], float]:
            return target_cost(self.target, self.space, self.latency, self.int8, ranks)

        def widths_for(cost: Callable[[dict[str, int]], float], budget: float) -> dict[str, int]:
            if allocation == "uniform":
                return uniform_widths(self.space, cost, budget, self.round_to)
            search = greedy_widths if allocation == "greedy" else anchored_widths
            return search(self.space, sensitivity, cost, budget, self.round_to)

        def search(budget: float) -> tuple[dict[str, int], Ranks]:
            if not rank_costs:
                return widths_for(self.cost, budget), {}
            return factorized_plan(sensitivity, rank_costs, cost_of, lambda cost: widths_for(cost, budget))

        details: dict[str, Any] = {
            "allocation": allocation, "sensitivity_batches": len(inputs),
            "sensitivity_images": sum(len(x) for x in inputs), "sensitivity_seconds": round(sensitivity_seconds, 2),
            "setup_seconds": round(self.setup_seconds, 2), "round_to": self.round_to, "floor": self.space.floor,
            "block": self.space.block,
            "factorize": factorize}
        # a latency search measures new table layers as it goes: one hold of the lock for all of them and the
        # checks, not a wait per layer for other processes' work to pause
        with exclusive_timing() if self.latency is not None else contextlib.nullcontext():
            widths, ranks = search(self.target.value)
            if self.latency is not None:
                widths, ranks = self._checked(network, (widths, ranks), search, cost_of, importance, checks, details)
        if self.latency is not None:
            details["latency_model"] = {**self.latency.describe(), **self.latency.table.describe(),
                                        "calibrated_on": self.runtime}
            details["predicted_ms"] = self.latency.predict(factored_shapes(self.space.shapes(widths), ranks))
            details["dense_predicted_ms"] = self.latency.predict(self.space.shapes(self.space.widths))
            details["reference_ms"] = self.latency.baseline_ms or details["dense_predicted_ms"]
            check = details["checks"][-1]
            details["measured_ms"] = check["measured_ms"]
            # in the target's unit: a ratio's dense network was timed beside, so the machine's load since the
            # calibration is not counted as error (the milliseconds alone drift with it)
            details["prediction_error"] = check["predicted"] / check["measured"] - 1
            details["met"] = check["measured"] <= self.target.value
            self.latency.table.save()
        summed = (sum(sensitivity[group][width] for group, width in widths.items())
                  + sum(rank_costs[layer][rank] for layer, rank in ranks.items()))
        return Plan(self.target, self.int8, widths, dict(self.space.widths), cost_of(ranks)(widths), self.dense_value,
                    summed, details, ranks)

    def _checked(self, network: nn.Module, layout: tuple[dict[str, int], Ranks],
                 search: Callable[[float], tuple[dict[str, int], Ranks]], cost_of: Callable[[Ranks], Callable],
                 importance: ImportanceLike, checks: int, details: dict[str, Any]) -> tuple[dict[str, int], Ranks]:
        """Measure the planned network beside the dense one and correct the budget by what was measured.

        A miss is measured again over more rounds first (on a busy machine one measurement can be tens of percent
        off, and each shrink cuts channels the target did not ask for), then re-planned under a budget shrunk by
        it. A plan within the target measuring below :data:`GROW_BELOW` of its prediction (again over more rounds),
        with :data:`GROW_CHECKS` checks left, is re-planned under a budget grown by the over-prediction (channels
        were cut that the target did not ask for); if the grown plan misses, the plan that met is measured again
        and kept. The last check measured the returned plan, unless the checks ran out on a miss: the plan
        re-planned under the shrunk budget is returned.
        """
        def value_of(measured: dict[str, float]) -> float:
            return measured["planned"] / (measured["dense"] if self.target.kind == "latency_ratio" else 1.0)

        def acted_on(value: float, predicted: float, may_grow: bool) -> bool:  # a miss, or would grow the plan
            return value > self.target.value or (may_grow and value < GROW_BELOW * predicted)

        budget, details["checks"] = self.target.value, []
        met: tuple[tuple[dict[str, int], Ranks], float] | None = None  # a plan measured within the target, its budget
        for left in range(checks, 0, -1):
            widths, ranks = layout
            planned = planned_copy(network, self.example, widths, ranks, importance)
            predicted = cost_of(ranks)(widths)
            may_grow = met is None and left >= GROW_CHECKS  # room for the grown plan's check and a fallback's
            rounds = 3
            measured = self.measure(rounds, dense=self.ratio_reference, planned=planned)
            if acted_on(value_of(measured), predicted, may_grow):
                rounds = REMEASURE_ROUNDS
                measured = self.measure(rounds, dense=self.ratio_reference, planned=planned)
            value = value_of(measured)
            details["checks"].append({"budget": budget, "predicted": predicted, "measured": value,
                                      "measured_ms": measured["planned"], "dense_measured_ms": measured["dense"],
                                      "rounds": rounds})
            if value > self.target.value and met is not None:  # grown too far: back to the plan that met
                layout, budget = met
                continue
            if not acted_on(value, predicted, may_grow):
                break
            if value <= self.target.value:  # over-predicted: a plan predicted this much more measures the budget
                met = (layout, budget)
                budget *= predicted / value
            else:
                budget *= self.target.value / value
            try:
                grown_or_shrunk = search(budget)
            except UnreachableTargetError:
                break
            if grown_or_shrunk == layout:
                break
            layout = grown_or_shrunk
        return layout


__all__ = ["TargetPlanner", "UnreachableTargetError"]
