"""ChannelPruning: structured pruning that physically removes channels while training.

Narrower layers make the model that leaves ``fit`` faster on any hardware, where unstructured
sparsity leaves dense kernels as slow as before.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_compress.core.accounting import count_macs
from lightning_compress.core.architecture import ArchitectureRecord, append_record, register_replay
from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.composition import Declaration, Effect
from lightning_compress.core.guards import check_finite
from lightning_compress.core.inputs import capture_network_input, first_sample
from lightning_compress.core.layers import select_layers, uncompiled_name, weighted_layers
from lightning_compress.core.progress import (
    Interval,
    Position,
    StepBudget,
    check_ordered,
    resolve_window,
    validate_interval,
    validate_position,
)
from lightning_compress.pruning.importance import ImportanceLike, resolve_importance
from lightning_compress.pruning.schedules import ScheduleLike, resolve_schedule
from lightning_compress.pruning.slimming import (
    check_prunable,
    group_channels,
    prunable_groups,
    remove_channels,
    replay_history,
    trace_dependencies,
)

RECORD_KIND = "channel_slimming"
"""Architecture-record kind of a channel removal (see :mod:`lightning_compress.core.architecture`)."""

_MAX_MACS_ROUNDS = 20


@register_replay(RECORD_KIND, version=1)
def replay_slimming(network: nn.Module, payload: Mapping[str, Any]) -> nn.Module:
    """Re-slim a freshly built network in place by one recorded ``channel_slimming`` removal."""
    parameter = next(network.parameters())
    example = torch.zeros(payload["input_shape"], dtype=parameter.dtype, device=parameter.device)
    replay_history(network, example, payload["history"])
    return network


def kept_channels(original: int, removed_fraction: float, round_to: int = 1) -> int:
    """How many of a group's ``original`` channels remain once ``removed_fraction`` of them are removed.

    ``round_to`` rounds the kept count to its nearest multiple (at least ``round_to``; a narrower group
    keeps all its channels). The result is in ``[1, original]``.

    Example:
        >>> kept_channels(16, 0.3), kept_channels(16, 0.3, round_to=8), kept_channels(6, 0.5, round_to=8)
        (11, 8, 6)
    """
    keep = max(1, original - round(removed_fraction * original))
    if round_to > 1:
        keep = min(original, max(round_to, round_to * round(keep / round_to)))
    return keep


class ChannelRemoval(CompressionCallback):
    """Removing whole channels while training: the machinery ChannelPruning and target-driven planning share.

    Between ``start`` and ``end`` channels are removed every ``update_every``; :meth:`_update` (the
    subclass) decides how many each coupled group keeps at each removal, :meth:`_slim_to` removes the
    least important ones by ``importance``, slices the optimizers' state, appends a ``channel_slimming``
    record and logs ``channels/<layer>`` and ``macs/ratio``. Arguments as :class:`ChannelPruning`'s.
    """

    effect = Effect.ARCHITECTURE

    def __init__(
        self,
        importance: ImportanceLike = "l1",
        schedule: ScheduleLike = "cubic",
        start: Position = 0.0,
        end: Position = 0.5,
        update_every: Interval = "1ep",
        ignore: str | Sequence[str] | None = None,
        network: str | None = None,
        round_to: int = 8,
    ) -> None:
        super().__init__(network)
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
        self.round_to = round_to
        self._importance = resolve_importance(importance)
        self._schedule = resolve_schedule(schedule)
        self.start = validate_position(start, "start")
        self.end = validate_position(end, "end")
        check_ordered(start, end, "start", "end")
        self.update_every = validate_interval(update_every, "update_every")
        self.ignore = ignore
        # resolved in setup / on the first batch
        self._ignored: list[str] = []
        self._graph = None
        # state that survives a restart
        self._input_shape: list[int] | None = None
        self._dense_macs: int | None = None
        self._original_channels: dict[str, int] = {}
        self._removed_fraction = 0.0
        self._last_update_step = -1

    # ----------------------------------------------------------------------------------- set-up
    @override
    def declaration(self, budget: StepBudget) -> Declaration:
        """Changes the architecture over its window; channel counts stay multiples of ``round_to``."""
        window = resolve_window(budget, self.start, self.end, self.update_every)
        if window.end >= budget.total_steps:
            raise ValueError(f"end={self.end!r} resolves to step {window.end}, but the run has {budget.total_steps} "
                             "steps: leave at least one step of fine-tuning after the last removal")
        return self.declare(window, channel_multiple=self.round_to)

    @override
    def setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the layers left alone (``ignore`` and the classifier)."""
        prefix = self.network_name + "."
        kept = select_layers(pl_module, include="*", exclude=self.ignore, argument_names=("include", "ignore"))
        layers = weighted_layers(pl_module)
        head = next((n for n in reversed(layers) if isinstance(pl_module.get_submodule(n), nn.Linear)), None)
        self._ignored = [uncompiled_name(n[len(prefix):]) for n in layers
                         if n.startswith(prefix) and (n not in kept or n == head)]

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Trace the network on the first batch's input, refusing one that cannot be slimmed; note dense state."""
        network = self.network_of(pl_module)
        if self._input_shape is None:
            called = getattr(pl_module, self.network_name)  # a compiled wrapper's input is its network's input
            example = first_sample(capture_network_input(pl_module, called, batch, batch_idx))
            if len(example) != 1 or not isinstance(example[0], torch.Tensor):
                raise ValueError(f"{type(self).__name__} traces a network called with one tensor; {self.network_name!r} "
                                 f"is called with {len(example)} arguments")
            self._input_shape = list(example[0].shape)
            check_prunable(network, example[0], self._ignored)
            self._dense_macs = count_macs(network, example[0])
        self._graph = trace_dependencies(network, self._example(network))
        groups = self._groups(network)
        if not self._original_channels:
            self._original_channels = {name: group_channels(group) for name, group in groups.items()}
            rank_zero_info(f"{type(self).__name__}: {len(groups)} coupled channel groups, "
                           f"{sum(self._original_channels.values())} channels, target {self.target[0]}={self.target[1]}")

    def _example(self, network: nn.Module) -> torch.Tensor:
        parameter = next(network.parameters())
        return torch.zeros(self._input_shape, dtype=parameter.dtype, device=parameter.device)

    def _groups(self, network: nn.Module) -> dict[str, Any]:
        return prunable_groups(self._graph, [network.get_submodule(name) for name in self._ignored])

    # ----------------------------------------------------------------------------------- training
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Remove channels when an update is due (the first batch traces the network)."""
        window, step = self.window, trainer.global_step
        if window is None or self._last_update_step >= window.end:
            return  # done: a resumed run never traces the (possibly quantization-prepared) network again
        if self._graph is None:
            self._attach(trainer, pl_module, batch, batch_idx)
        due = window.is_update_step(step) or (step > window.end and self._last_update_step < window.end)
        if not due or self._last_update_step >= min(step, window.end):
            return
        progress = (min(step, window.end) - window.start) / (window.end - window.start)
        self._last_update_step = step
        network = self.network_of(pl_module)
        example = self._example(network)
        self._update(trainer, pl_module, network, example, progress)
        check_finite(dict(network.named_parameters(prefix=self.network_name)), step, type(self).__name__)
        self._log(pl_module, network, example)

    @abc.abstractmethod
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
                example: torch.Tensor, progress: float) -> None:
        """Remove what is due at ``progress`` (0 at ``start``, 1 at ``end``) of the window, through :meth:`_slim_to`."""

    def _keep(self, root: str, removed_fraction: float) -> int:
        """Channels group ``root`` keeps at ``removed_fraction``: that fraction of its original ones removed."""
        return kept_channels(self._original_channels[root], removed_fraction, self.round_to)

    def _slim_to(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
                 removed_fraction: float) -> bool:
        """Remove channels until each group keeps :meth:`_keep` of them at ``removed_fraction``."""
        plan: dict[str, list[int]] = {}
        if trainer.is_global_zero:
            for root, group in self._groups(network).items():
                keep = self._keep(root, removed_fraction)
                excess = group_channels(group) - keep
                if excess > 0:
                    scores = self._importance(group)
                    plan[root] = torch.argsort(scores.float(), stable=True)[:excess].tolist()
        plan = trainer.strategy.broadcast(plan, src=0)
        self._removed_fraction = max(self._removed_fraction, removed_fraction)
        if not plan:
            return False
        remove_channels(self._graph, plan, trainer.optimizers)
        removal = [list(entry) for entry in self._graph.pruning_history()[-len(plan):]]
        append_record(pl_module, ArchitectureRecord(
            RECORD_KIND, self.network_name, {"input_shape": list(self._input_shape), "history": removal}))
        self.rewrap_distributed(trainer)
        return True

    def _log(self, pl_module: pl.LightningModule, network: nn.Module, example: torch.Tensor) -> None:
        groups = self._groups(network)
        for root, group in groups.items():
            pl_module.log(f"channels/{self.network_name}.{root}", float(group_channels(group)))
        self._log_macs(pl_module, network, example)

    def _log_macs(self, pl_module: pl.LightningModule, network: nn.Module, example: torch.Tensor) -> None:
        """Log the network's MACs as a fraction of the dense network's (``macs/ratio``)."""
        pl_module.log("macs/ratio", count_macs(network, example) / self._dense_macs)

    # ----------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """What survives a restart: the dense measurements and how much was removed when."""
        return {
            "input_shape": self._input_shape,
            "dense_macs": self._dense_macs,
            "original_channels": dict(self._original_channels),
            "removed_fraction": self._removed_fraction,
            "last_update_step": self._last_update_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore it; the network is traced again on the next batch."""
        self._input_shape = state_dict["input_shape"]
        self._dense_macs = state_dict["dense_macs"]
        self._original_channels = dict(state_dict["original_channels"])
        self._removed_fraction = state_dict["removed_fraction"]
        self._last_update_step = state_dict["last_update_step"]
        self._graph = None  # traced again on the (already slimmed) network at the next batch


class ChannelPruning(ChannelRemoval):
    """Gradually remove whole channels during training, until a channel or MACs target is reached.

    Between ``start`` and ``end`` channels are removed every ``update_every``, by an amount following
    ``schedule``; training goes on between removals, so the network recovers as it shrinks. Every
    coupled group (found by :mod:`~lightning_compress.pruning.slimming`) loses the same fraction, its
    least important channels by ``importance``. Optimizers keep their identity, their state sliced to the
    kept channels. Each removal appends a ``channel_slimming`` architecture record, so checkpoints
    resume slimmed. Logs ``channels/<layer>`` and ``macs/ratio`` (current / dense MACs).

    Args:
        channel_ratio: Fraction of each group's channels removed by ``end``, in (0, 1).
        kept_macs_ratio: Fraction of the dense MACs kept at ``end``, in (0, 1). Give exactly one of
            ``channel_ratio`` and ``kept_macs_ratio``.
        importance: ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"taylor"`` or a criterion object
            (:mod:`lightning_compress.pruning.importance`).
        schedule: A name from :data:`~lightning_compress.pruning.schedules.SCHEDULES` or a callable; for
            ``kept_macs_ratio`` it schedules the fraction of MACs removed.
        start: When the first channels are removed (a :mod:`~lightning_compress.core.progress` position).
        end: When the target is reached; at least one step of fine-tuning must follow.
        update_every: Interval between removals: optimizer steps (int), ``"1ep"``, ``"50steps"`` or a
            fraction of the run.
        ignore: Globs of layers (qualified names, e.g. ``"model.layer3.*"``) whose output channels stay;
            the classifier (the last ``Linear``) always stays.
        network: Attribute of the LightningModule holding the network; ``None`` finds it.
        round_to: Every group keeps a multiple of this many channels (at least ``round_to``), the block
            width of convolution kernels; ``1`` keeps exact fractions. The speedups behind the default
            are in ``benchmarks/results/channel_pruning.md`` and ``channel_pruning_round_to.md``.

    Example:
        >>> pruning = ChannelPruning(kept_macs_ratio=0.5, importance="l2", start=0.0, end=0.6, update_every="1ep")
        >>> pruning.target
        ('kept_macs_ratio', 0.5)
    """

    def __init__(
        self,
        channel_ratio: float | None = None,
        kept_macs_ratio: float | None = None,
        importance: ImportanceLike = "l1",
        schedule: ScheduleLike = "cubic",
        start: Position = 0.0,
        end: Position = 0.5,
        update_every: Interval = "1ep",
        ignore: str | Sequence[str] | None = None,
        network: str | None = None,
        round_to: int = 8,
    ) -> None:
        if (channel_ratio is None) == (kept_macs_ratio is None):
            raise ValueError("give exactly one of channel_ratio (fraction of channels removed) and "
                             f"kept_macs_ratio (fraction of MACs kept), got channel_ratio={channel_ratio!r}, "
                             f"kept_macs_ratio={kept_macs_ratio!r}")
        name, value = ("channel_ratio", channel_ratio) if channel_ratio is not None else ("kept_macs_ratio", kept_macs_ratio)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        self.target = (name, float(value))
        super().__init__(importance, schedule, start, end, update_every, ignore, network, round_to)

    @override
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
                example: torch.Tensor, progress: float) -> None:
        """Remove channels to the scheduled fraction of channels, or of MACs, at ``progress`` of the window."""
        name, final = self.target
        if name == "channel_ratio":
            self._slim_to(trainer, pl_module, network, self._schedule(progress, 0.0, final))
        else:
            kept_macs = 1.0 - self._schedule(progress, 0.0, 1.0 - final)
            self._slim_to_macs(trainer, pl_module, network, example, kept_macs)

    def _slim_to_macs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
                      example: torch.Tensor, kept_macs: float) -> None:
        """Raise the removed channel fraction until at most ``kept_macs`` of the dense MACs remain.

        MACs fall roughly with the square of the kept fraction, so each round closes the square root of the
        gap, approaching the target from above.
        """
        for _ in range(_MAX_MACS_ROUNDS):
            ratio = count_macs(network, example) / self._dense_macs
            if ratio <= kept_macs * 1.005:
                return
            kept = (1.0 - self._removed_fraction) * math.sqrt(kept_macs / ratio)
            fraction = max(1.0 - kept, self._removed_fraction + 0.5 / max(self._original_channels.values()))
            self._slim_to(trainer, pl_module, network, min(fraction, 1.0))
