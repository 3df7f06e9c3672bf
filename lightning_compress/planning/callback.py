"""CompressToTarget: name the latency (or size, or MACs) the deployed model must meet; the channels are planned.

On the first batch the callback traces the network and calibrates a latency model on the deployment
runtime (:class:`~lightning_compress.planning.target.TargetPlanner`), refusing an unreachable target
before the first optimizer step. At ``start`` it measures each channel group's sensitivity on held-out
batches, plans every group's width (:mod:`~lightning_compress.planning.planner`) and removes channels
toward the plan by ``end`` with ChannelPruning's own machinery (records, optimizer state, resume). With a
quantization callback in the Trainer the plan is for the int8 network that callback ships. After fit it
measures the shipped network on the runtime and logs predicted against measured latency.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.core.accounting import count_macs
from lightning_compress.core.composition import Declaration
from lightning_compress.core.executorch import ExecuTorchNetwork
from lightning_compress.core.inputs import capture_network_input
from lightning_compress.core.onnx import OnnxRuntimeNetwork
from lightning_compress.core.progress import Interval, Position, StepBudget
from lightning_compress.data.cache import default_cache_dir
from lightning_compress.factorization import LowRankFactorization
from lightning_compress.factorization.blocks import max_rank
from lightning_compress.factorization.callback import swap_in_factorized
from lightning_compress.planning.latency import RUNTIMES, table_runtime, timed_programs
from lightning_compress.planning.planner import (
    ALLOCATIONS,
    Plan,
    Target,
    UnreachableTargetError,
    runtime_program,
)
from lightning_compress.planning.ranks import METHOD
from lightning_compress.planning.target import REMEASURE_ROUNDS, TargetPlanner, timed_engines
from lightning_compress.pruning.channel import ChannelRemoval
from lightning_compress.pruning.importance import ImportanceLike
from lightning_compress.pruning.schedules import ScheduleLike
from lightning_compress.quantization import PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.quantization.convert import convert
from lightning_compress.quantization.engines import ONNX_ENGINES
from lightning_compress.quantization.prepare import is_prepared


def default_table_path() -> Path:
    """Where latency tables are cached: ``latency_tables`` in the package's cache folder
    (:func:`~lightning_compress.data.cache.default_cache_dir`: ``$LIGHTNING_COMPRESS_CACHE`` or
    ``~/.cache/lightning_compress``)."""
    return default_cache_dir() / "latency_tables"


def default_table_file(runtime: str, batch_size: int, threads: int) -> Path:
    """The cached latency table for one runtime, batch size and thread count, under :func:`default_table_path`
    (ExecuTorch's plans read onnxruntime's table: :func:`~lightning_compress.planning.latency.table_runtime`).

    Example:
        >>> default_table_file("executorch", 64, 1).name
        'onnxruntime_b64_t1.json'
    """
    return default_table_path() / f"{table_runtime(runtime)}_b{batch_size}_t{threads}.json"


class CompressToTarget(ChannelRemoval):
    """Remove channels during training until the deployed network meets a latency, size or MACs target.

    Give exactly one target. Latency is measured on ``runtime`` at ``batch_size`` and ``threads`` (the
    deployment's), per layer in a table cached per CPU and runtime, calibrated on the dense, the narrowest
    and the uniform widths meeting the target, measured end to end. Every coupled channel group gets its own width (multiples of
    ``round_to``): the planner narrows first the groups whose removal costs the least output fidelity on
    held-out batches per millisecond saved. Add ``QuantizationAwareTraining`` (an ONNX engine; ``"xnnpack"`` for
    ``runtime="executorch"``) to plan for the int8 network it ships; add ``KnowledgeDistillation(teacher="self")``
    to recover accuracy. ExecuTorch's layers are costed by onnxruntime's table, calibrated and checked on
    ExecuTorch programs of the whole network (each lowering takes seconds to a minute).

    Logs ``plan/predicted`` (at ``start``), ``plan/measured_ms``, ``plan/dense_ms`` (timed beside it),
    ``plan/predicted_ms`` and ``plan/prediction_error`` (after fit), and the plan as TensorBoard text; :attr:`plan` and
    :attr:`measured` hold them, and a ``CompressionReport`` in the same Trainer reports them.

    Args:
        latency_ms: Milliseconds per batch on ``runtime``.
        latency_ratio: Fraction of the dense network's latency, in (0, 1): of the fp32 dense network, also when
            the network ships int8 (with ``QuantizationAwareTraining``).
        size_kb: Kilobytes of weights as shipped (int8: one byte each, fp32: four).
        macs_ratio: Fraction of the dense MACs, in (0, 1) (no runtime measured).
        runtime: ``"onnxruntime"``, ``"openvino"`` or ``"executorch"`` (XNNPACK).
        batch_size: The deployment's batch size.
        threads: The deployment's inference threads.
        sensitivity_batches: Validation batches (the current training batch without a validation loader)
            measuring each group's sensitivity at ``start``.
        table_path: JSON file caching the latency table (default: :func:`default_table_path`, one file per
            runtime, batch size and threads).
        repeats: Timed calls per latency measurement.
        importance, schedule, start, end, update_every, ignore, network, round_to: As ``ChannelPruning``'s.
        allocation: ``"sensitivity"`` (from the uniform widths, channels traded between groups by sensitivity,
            each group within 2x of its uniform width), ``"uniform"`` (one kept fraction for every group, the
            largest that meets the target: the baseline, measured on the same runtime) or ``"greedy"`` (from
            the dense widths, the least sensitive narrowed first, without bounds).
        factorize: Also plan a Tucker-2 rank for ``k x k`` convolutions where the latency it saves lets the widths
            keep more fidelity than the factorization costs (:func:`~lightning_compress.planning.planner.
            factorized_plan`); those layers are factorized at ``end``, after the last channel removal, as
            ``LowRankFactorization`` factorizes (its record, the optimizer state moved onto the factors).

    Example:
        >>> CompressToTarget(latency_ratio=0.5, runtime="onnxruntime", batch_size=1, threads=1).target
        ('latency_ratio', 0.5)
    """

    def __init__(
        self,
        latency_ms: float | None = None,
        latency_ratio: float | None = None,
        size_kb: float | None = None,
        macs_ratio: float | None = None,
        runtime: str = "onnxruntime",
        batch_size: int = 1,
        threads: int = 1,
        sensitivity_batches: int = 4,
        table_path: str | None = None,
        repeats: int = 50,
        importance: ImportanceLike = "l1",
        schedule: ScheduleLike = "cubic",
        start: Position = 0.0,
        end: Position = 0.5,
        update_every: Interval = "1ep",
        ignore: str | Sequence[str] | None = None,
        network: str | None = None,
        round_to: int = 8,
        allocation: str = "sensitivity",
        factorize: bool = False,
    ) -> None:
        goal = Target.from_arguments(latency_ms=latency_ms, latency_ratio=latency_ratio, size_kb=size_kb,
                                     macs_ratio=macs_ratio)
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        for name, value in (("batch_size", batch_size), ("threads", threads),
                            ("sensitivity_batches", sensitivity_batches), ("repeats", repeats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if importance == "taylor":
            raise ValueError("importance='taylor' needs gradients, which the plan's sensitivity (measured without "
                             "training) does not have: use one of 'l1', 'l2', 'bn_scale' or a gradient-free callable")
        super().__init__(importance, schedule, start, end, update_every, ignore, network, round_to)
        self.goal, self.target = goal, (goal.kind, goal.value)
        self.runtime, self.batch_size, self.threads, self.repeats = runtime, batch_size, threads, repeats
        self.sensitivity_batches, self.allocation, self.factorize = sensitivity_batches, allocation, factorize
        self.table_path = table_path
        self._int8 = False
        self._engine: str | None = None
        self._planner: TargetPlanner | None = None
        self._dense_at_setup: nn.Module | None = None  # timed beside the shipped network in a fit resumed after planning
        self._planned_on_rank_zero = False  # the latency model is calibrated (on rank 0) and the target reachable
        self._batch: tuple[Any, int] | None = None
        self.plan: Plan | None = None
        self.measured: dict[str, Any] | None = None

    @override
    def declaration(self, budget: StepBudget) -> Declaration:
        """ChannelPruning's; with ``factorize``, it also replaces layers (a weight mask must start after it)."""
        declared = super().declaration(budget)
        return replace(declared, details={**declared.details, "replaces_layers": True}) if self.factorize else declared

    # ----------------------------------------------------------------------------------- set-up
    @override
    def setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find whether the network ships int8 (a quantization callback) and run after its conversion."""
        super().setup_fit(trainer, pl_module)
        quantizers = [cb for cb in trainer.callbacks
                      if isinstance(cb, (QuantizationAwareTraining, PostTrainingQuantization))]
        if self.factorize and any(isinstance(cb, LowRankFactorization) for cb in trainer.callbacks):
            raise ValueError("CompressToTarget(factorize=True) plans the factorizations itself: remove "
                             "LowRankFactorization from the Trainer, or set factorize=False")
        self._int8 = bool(quantizers)
        if self.goal.kind.startswith("latency") and trainer.is_global_zero:  # before a checkpoint's records replay
            self._dense_at_setup = copy.deepcopy(self.network_of(pl_module)).cpu().float()
        self._engine = quantizers[0].engine.name if quantizers else None
        engines = timed_engines(self.runtime)
        if self._int8 and self.goal.kind.startswith("latency") and self._engine not in engines:
            raise ValueError(f"CompressToTarget plans latency on {self.runtime}, which runs the int8 program of the "
                             f"engines {engines}; {type(quantizers[0]).__name__} has engine={self._engine!r}: "
                             f"train with one of {engines}")
        # a new list: Lightning is iterating over the current one; teardown then follows the int8 conversion
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]

    def _table_path(self) -> Path:
        if self.table_path is not None:
            return Path(self.table_path)
        return default_table_file(self.runtime, self.batch_size, self.threads)

    @override
    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Trace as ChannelPruning does; before any plan, calibrate the latency model and refuse an unreachable target."""
        super()._attach(trainer, pl_module, batch, batch_idx)
        if self.plan is not None or self._planned_on_rank_zero:
            return
        refusal = None
        if trainer.is_global_zero:
            network = self.network_of(pl_module)
            example = self._example(network)
            calibration = [capture_network_input(pl_module, getattr(pl_module, self.network_name), batch, batch_idx)[0]]
            with torch.random.fork_rng(devices=[]):  # measuring must not move the training's random stream
                self._planner = TargetPlanner(
                    copy.deepcopy(network), example, self.goal, self.runtime, self.batch_size, self.threads,
                    self._int8, self.round_to, self._ignored, self._table_path(), self.repeats, calibration,
                    self._engine)
            self._dense_at_setup = None  # the planner holds the dense network
            try:
                self._planner.check_reachable()
            except UnreachableTargetError as err:
                refusal = str(err)
        # every rank refuses together (a refusal on rank 0 alone would leave the others waiting in a collective)
        refusal = trainer.strategy.broadcast(refusal, src=0)
        self._planned_on_rank_zero = True
        if refusal is not None:
            raise UnreachableTargetError(refusal)
        if trainer.is_global_zero:  # only rank 0 has the planner (the message is built before rank_zero_info)
            rank_zero_info(f"CompressToTarget: {self.goal.kind}={self.goal.value:g} reachable (dense "
                           f"{self._planner.dense_value:.4g}, narrowest {self._planner.closest():.4g} "
                           f"{self.goal.unit}); planning at step {self.window.start}")

    # ----------------------------------------------------------------------------------- planning
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Keep the batch at hand (sensitivity falls back on it), then remove channels as ChannelPruning does."""
        self._batch = (batch, batch_idx)
        try:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        finally:
            self._batch = None

    @override
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
                example: torch.Tensor, progress: float) -> None:
        """Plan at the first removal, then move every group toward its planned width as scheduled."""
        if self.plan is None:
            plan = None
            if trainer.is_global_zero:
                inputs = self._held_out_inputs(trainer, pl_module, *self._batch)
                with torch.random.fork_rng(devices=[]):
                    plan = self._planner.plan(copy.deepcopy(network), inputs, self._importance,
                                              allocation=self.allocation, factorize=self.factorize).as_dict()
            self.plan = Plan.from_dict(trainer.strategy.broadcast(plan, src=0))
            self._planner_done(trainer)
            if self.plan.details.get("met") is False:
                check = self.plan.details["checks"][-1]
                rank_zero_warn(f"CompressToTarget: the planned network measured {check['measured']:.4g} "
                               f"{self.goal.unit} end to end against {self.goal.kind}={self.goal.value:g} after "
                               f"{len(self.plan.details['checks'])} check(s); channels are removed to the plan anyway "
                               "(the latency table mis-predicts this network on this runtime)")
        self._slim_to(trainer, pl_module, network, self._schedule(progress, 0.0, 1.0))
        if progress >= 1.0 and self.plan.ranks:  # the widths are final: factorize at the planned ranks
            swap_in_factorized(self, trainer, pl_module, network, {
                name: (METHOD, min(rank, max_rank(network.get_submodule(name), METHOD)))
                for name, rank in self.plan.ranks.items()})
            for name, rank in self.plan.ranks.items():
                pl_module.log(f"factorization/{self.network_name}.{name}/rank", float(rank))

    @override
    def _log(self, pl_module: pl.LightningModule, network: nn.Module, example: torch.Tensor) -> None:
        """As ChannelPruning logs; once the network is factorized (the traced groups no longer match its layers),
        the planned widths it was slimmed to."""
        if self.plan is None or not self.plan.ranks or self._last_update_step < self.window.end:
            super()._log(pl_module, network, example)
            return
        for root, width in self.plan.widths.items():
            pl_module.log(f"channels/{self.network_name}.{root}", float(width))
        self._log_macs(pl_module, network, example)

    def _held_out_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                         batch_idx: int) -> list[torch.Tensor]:
        """Network inputs of the first validation batches, also where the Trainer does not validate
        (``limit_val_batches=0``) but the DataModule or module defines a validation loader, or of the current
        training batch without one (the training loader is never iterated here: its position belongs to the fit)."""
        called = getattr(pl_module, self.network_name)
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        loaders = trainer.val_dataloaders
        if loaders is None and source.is_defined():  # not set up yet, or never (the Trainer does not validate)
            loaders = source.dataloader()
        loader = (loaders[0] if isinstance(loaders, (list, tuple)) else loaders) if loaders else None
        if loader is None:
            rank_zero_warn("CompressToTarget: no validation loader; channel sensitivity is measured on the current "
                           "training batch")
            return [capture_network_input(pl_module, called, batch, batch_idx)[0]]
        inputs = []
        with torch.random.fork_rng(devices=[]):  # a loader's iterator draws its seed from the global generator
            for index, held_out in enumerate(itertools.islice(loader, self.sensitivity_batches)):
                held_out = pl_module._apply_batch_transfer_handler(held_out)
                inputs.append(capture_network_input(pl_module, called, held_out, index)[0])
        return inputs

    def _planner_done(self, trainer: pl.Trainer) -> None:
        plan = self.plan
        rank_zero_info(f"CompressToTarget: plan ({plan.details.get('sensitivity_images', 0)} held-out images)\n"
                       + plan.render())
        for logger in trainer.loggers:
            logger.log_metrics({"plan/predicted": float(plan.predicted)}, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("plan/widths", plan.render(), trainer.global_step)

    @override
    def _keep(self, root: str, removed_fraction: float) -> int:
        """``removed_fraction`` (0 -> 1 over the window) of the way from the original width to the planned one."""
        original = self._original_channels[root]
        planned = self.plan.widths.get(root, original)
        keep = original - round(removed_fraction * (original - planned))
        return min(original, max(planned, math.ceil(keep / self.round_to) * self.round_to))

    # ----------------------------------------------------------------------------------- after fit
    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After a completed fit: measure the shipped network on the runtime against the plan's prediction, log it."""
        super().teardown(trainer, pl_module, stage)
        if stage != "fit" or trainer.interrupted or not trainer.is_global_zero:
            return
        measured = self.measure_shipped(pl_module)
        if measured is None:
            return
        beside = f", dense {measured['dense_ms']:.4g} ms timed beside it" if "dense_ms" in measured else ""
        rank_zero_info(f"CompressToTarget: shipped network {measured['measured_ms']:.4g} ms on {self.runtime} "
                       f"(predicted {measured['predicted_ms']:.4g} ms, target {measured['target_ms']:.4g} ms{beside})")
        for logger in trainer.loggers:
            logger.log_metrics({f"plan/{key}": value for key, value in measured.items()}, step=trainer.global_step)
            logger.save()

    def measure_shipped(self, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """The network as fit ships it, timed on the runtime beside the dense network; measured once.

        The plan's prediction is a fraction of the dense network's predicted latency; it is compared at the dense
        network's latency measured now, interleaved with the shipped one, so the machine's load when the latency
        model was calibrated (the first batch) and now does not count as prediction error. A fit resumed after
        planning times the network as it was at ``setup``, before the checkpoint's records slimmed it, as the dense
        one (only if its MACs are the dense network's: else the prediction is the absolute one, calibrated in the
        first process).
        ``CompressionReport`` asks for it too, whichever of the two tears down first. A network measuring above the
        target is measured again over more rounds (as the plan's checks are).

        Args:
            pl_module: The LightningModule after fit (its network converted to int8 when one ships).

        Returns:
            ``measured_ms``, ``predicted_ms``, ``prediction_error`` (predicted / measured - 1), ``target_ms``,
            ``rounds`` (interleaved rounds of the measurement) and, when the dense network was timed beside it,
            ``dense_ms``; ``None`` without a plan, for size and MACs
            targets, or when the int8 network was neither converted nor prepared for an ONNX engine (whose QDQ
            file is then built from the prepared network and measured).
        """
        if self.measured is not None:
            return self.measured
        if self.plan is None or not self.goal.kind.startswith("latency") or self._input_shape is None:
            return None
        network = getattr(pl_module, self.network_name)
        if isinstance(network, (OnnxRuntimeNetwork, ExecuTorchNetwork)):  # the engine check matched it to the runtime
            shipped: nn.Module | bytes = network.program_bytes()
        elif self._int8 and self._engine in ONNX_ENGINES and is_prepared(self.network_of(pl_module)):
            # not converted at fit end (convert_on_fit_end=False): the QDQ file `lightning-compress export` ships
            example = torch.zeros([1, *self._input_shape[1:]])
            shipped = convert(copy.deepcopy(self.network_of(pl_module)), self._engine, (example,)).program_bytes()
        elif self._int8:
            rank_zero_warn("CompressToTarget: the network was not converted to int8; its latency is not measured")
            return None
        else:
            shipped = copy.deepcopy(self.network_of(pl_module)).cpu().float()
        details = self.plan.details
        rounds = 3
        measured = self._time_shipped(shipped, rounds)
        if measured["measured_ms"] > measured["target_ms"]:  # a miss is measured again, as the plan's checks are
            rounds = REMEASURE_ROUNDS
            measured = self._time_shipped(shipped, rounds)
        if "dense_ms" in measured:  # the prediction carried to the machine's load now, by the reference timed beside
            reference_ms = details.get("reference_ms", details["dense_predicted_ms"])
            predicted = details["predicted_ms"] / reference_ms * measured["dense_ms"]
        else:
            predicted = details["predicted_ms"]
        self.measured = {**measured, "predicted_ms": predicted,
                         "prediction_error": predicted / measured["measured_ms"] - 1, "rounds": rounds}
        return self.measured

    def _time_shipped(self, shipped: nn.Module | bytes, rounds: int) -> dict[str, float]:
        """``measured_ms`` and ``target_ms`` of the shipped network over ``rounds`` interleaved rounds, and
        ``dense_ms`` when a dense network is at hand to time beside it (:meth:`_dense_for_timing`)."""
        if self._planner is not None:
            measured = self._planner.measure(rounds, dense=self._planner.ratio_reference, shipped=shipped)
        else:
            batch = torch.zeros([self.batch_size, *self._input_shape[1:]])
            programs = {"shipped": shipped if isinstance(shipped, bytes)
                        else runtime_program(shipped, batch, False, self.runtime)}
            dense = self._dense_for_timing()
            if dense is not None:
                programs["dense"] = runtime_program(dense, batch, False, self.runtime)
            measured = timed_programs(programs, self.runtime, self.threads, batch.numpy(), self.repeats, rounds)
        timed = {"measured_ms": measured["shipped"]}
        if "dense" in measured:
            timed["dense_ms"] = dense_ms = measured["dense"]
        else:
            details = self.plan.details
            dense_ms = details.get("reference_ms", details.get("dense_predicted_ms", 0.0))
        return {**timed, "target_ms": self.goal.value * (dense_ms if self.goal.kind == "latency_ratio" else 1.0)}

    def _dense_for_timing(self) -> nn.Module | None:
        """The network as it was at ``setup`` when it is the dense float one (its MACs the dense network's, not
        prepared for quantization): a module loaded already slimmed is not."""
        dense = self._dense_at_setup
        if dense is None or is_prepared(dense):
            return None
        return dense if count_macs(dense, torch.zeros(self._input_shape)) == self._dense_macs else None

    # ----------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """ChannelPruning's state and the plan (plain data)."""
        return {**super().state_dict(), "plan": self.plan.as_dict() if self.plan is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore them; a restored plan is carried on, never re-planned."""
        super().load_state_dict(state_dict)
        self.plan = Plan.from_dict(state_dict["plan"]) if state_dict.get("plan") is not None else None
