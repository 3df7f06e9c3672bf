"""LowRankFactorization: replace layers by low-rank or depthwise-separable blocks at a point of the run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.core.accounting import count_macs
from lightning_compress.core.architecture import ArchitectureRecord, append_record, register_replay
from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.composition import Declaration, Effect
from lightning_compress.core.guards import check_finite
from lightning_compress.core.inputs import capture_network_input, first_sample
from lightning_compress.core.layers import matches_any, select_layers, uncompiled_name
from lightning_compress.core.optimizers import replace_parameters
from lightning_compress.core.progress import Position, StepBudget, StepWindow, validate_position
from lightning_compress.factorization.allocation import (
    LayerOptions,
    Option,
    allocate_by_energy,
    allocate_by_macs,
    candidate_ranks,
)
from lightning_compress.factorization.blocks import (
    FACTORIZABLE_TYPES,
    KXK_METHODS,
    block_macs,
    factorize_layer,
    factorized_structure,
    is_factorizable,
    layer_geometries,
    layer_method,
    max_rank,
)
from lightning_compress.factorization.decompositions import truncation_errors

RECORD_KIND = "low_rank_factorization"
"""Architecture-record kind of a factorization (see :mod:`lightning_compress.core.architecture`)."""


@register_replay(RECORD_KIND, version=1)
def replay_factorization(network: nn.Module, payload: Mapping[str, Any]) -> nn.Module:
    """Swap a fresh network's layers for blocks of a ``low_rank_factorization`` record's ranks, in place."""
    for entry in payload["layers"]:
        layer = network.get_submodule(entry["name"])
        network.set_submodule(entry["name"], factorized_structure(layer, entry["method"], int(entry["rank"])))
    return network


def swap_in_factorized(callback: CompressionCallback, trainer: pl.Trainer, pl_module: pl.LightningModule,
                       network: nn.Module, layers: Mapping[str, tuple[str, int]]) -> None:
    """Replace ``layers`` (``{name relative to the network: (method, rank)}``) of a network in training by
    factorized blocks initialized from their weights, in place: the optimizers' parameters and state move onto the
    factors, distributed wrappers are rebuilt, and a ``low_rank_factorization`` record lets a reload rebuild them.

    Args:
        callback: The callback doing it (its network name; it rewraps distributed strategies).
        trainer: The Trainer.
        pl_module: The LightningModule holding ``network``.
        network: The network (``callback.network_of(pl_module)``).
        layers: What to factorize.

    Raises:
        FloatingPointError: If a factor is not finite.
    """
    replacements: dict[torch.Tensor, list[torch.Tensor]] = {}
    for name, (method, rank) in layers.items():
        layer = network.get_submodule(name)
        block = factorize_layer(layer, method, rank)
        replacements[layer.weight] = [module.weight for module in block]
        if layer.bias is not None:
            replacements[layer.bias] = [block[-1].bias]
        network.set_submodule(name, block)
    replace_parameters(trainer.optimizers, replacements)
    callback.rewrap_distributed(trainer)
    append_record(pl_module, ArchitectureRecord(RECORD_KIND, callback.network_name, {
        "layers": [{"name": name, "method": method, "rank": rank} for name, (method, rank) in layers.items()]}))
    check_finite({f"{callback.network_name}.{name}.{key}": value for name in layers
                  for key, value in network.get_submodule(name).named_parameters()},
                 trainer.global_step, type(callback).__name__)


def _check_ranks(ranks: Any) -> int | dict[str, int] | None:
    def valid(rank: Any) -> bool:
        return not isinstance(rank, bool) and isinstance(rank, int) and rank >= 1

    if ranks is None or valid(ranks):
        return ranks
    if isinstance(ranks, Mapping) and ranks and all(isinstance(k, str) and valid(v) for k, v in ranks.items()):
        return dict(ranks)
    raise ValueError(f"ranks must be an integer >= 1 (every layer) or a non-empty {{layer glob: integer >= 1}} "
                     f"mapping, got {ranks!r}")


class LowRankFactorization(CompressionCallback):
    """Replace Conv2d/Linear layers by cheaper factorized blocks, initialized from their weights, then fine-tune.

    At ``start`` every selected layer becomes an ``nn.Sequential`` of thinner layers: ``Linear`` and 1x1
    convolutions by a truncated SVD, kxk convolutions by ``method`` (see
    :mod:`~lightning_compress.factorization.decompositions`). Grouped convolutions stay. Ranks come from
    one target: ``kept_macs_ratio`` (:func:`~lightning_compress.factorization.allocation.allocate_by_macs`),
    ``energy`` or ``ranks``. New parameters join the replaced ones' param groups; an architecture record
    lets checkpoints load factorized. Logs ``factorization/<layer>/rank`` and ``macs/ratio``.

    Args:
        kept_macs_ratio: Fraction of the network's MACs at fit start kept, in (0, 1).
        ranks: One rank for every selected layer, or ``{layer glob: rank}`` (first match wins, every
            layer must match); at most each layer's full rank.
        energy: Fraction of each weight's squared norm kept, in (0, 1]. Give exactly one of
            ``kept_macs_ratio``, ``ranks`` and ``energy``.
        method: For kxk convolutions: ``"tucker2"``, ``"spatial"`` or ``"depthwise_separable"``.
        start: When to factorize (a fraction of the run, ``"<n>ep"`` or ``"<n>steps"``); at least one
            step of fine-tuning must follow.
        round_to: Ranks chosen by ``kept_macs_ratio``/``energy`` are multiples of this (or full rank).
        include: Globs of layer names (e.g. ``"model.layer3.*"``) to factorize; default: every
            Conv2d/Linear but the first convolution and the last Linear.
        exclude: Globs of layer names to leave dense.
        network: Attribute of the LightningModule holding the network; ``None`` finds it.

    Example:
        >>> factorization = LowRankFactorization(kept_macs_ratio=0.5, method="tucker2", round_to=8)
        >>> factorization.target
        ('kept_macs_ratio', 0.5)
    """

    effect = Effect.ARCHITECTURE

    def __init__(
        self,
        kept_macs_ratio: float | None = None,
        ranks: int | Mapping[str, int] | None = None,
        energy: float | None = None,
        method: str = "tucker2",
        start: Position = 0.0,
        round_to: int = 1,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        network: str | None = None,
    ) -> None:
        super().__init__(network)
        given = {k: v for k, v in (("kept_macs_ratio", kept_macs_ratio), ("ranks", ranks), ("energy", energy))
                 if v is not None}
        if len(given) != 1:
            raise ValueError("give exactly one of kept_macs_ratio (fraction of MACs kept), ranks (per layer) and "
                             f"energy (fraction of each weight's squared norm kept), got {given or 'none'}")
        if kept_macs_ratio is not None and (isinstance(kept_macs_ratio, bool) or not isinstance(
                kept_macs_ratio, (int, float)) or not 0.0 < kept_macs_ratio < 1.0):
            raise ValueError(f"kept_macs_ratio must be a number in (0, 1), got {kept_macs_ratio!r}")
        if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                                   or not 0.0 < energy <= 1.0):
            raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")
        self.ranks = _check_ranks(ranks)
        name = next(iter(given))
        self.target = (name, self.ranks if name == "ranks" else float(given[name]))
        if method not in KXK_METHODS:
            raise ValueError(f"method must be one of {KXK_METHODS}, got {method!r}")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
        self.method = method
        self.start = validate_position(start, "start")
        self.round_to = round_to
        self.include = include
        self.exclude = exclude
        # resolved in setup / on the first batch
        self._layers: list[str] = []  # relative to the network
        self._example: tuple[Any, ...] | None = None
        # state that survives a restart
        self._dense_macs: int | None = None
        self._factorized: dict[str, tuple[str, int]] = {}
        self._done = False

    # ----------------------------------------------------------------------------------- set-up
    @override
    def declaration(self, budget: StepBudget) -> Declaration:
        """Replaces layers at one step; factor widths are multiples of ``round_to``."""
        step = budget.resolve(self.start, "start")
        if step >= budget.total_steps:
            raise ValueError(f"start={self.start!r} resolves to step {step}, but the run has {budget.total_steps} "
                             "steps: leave at least one step of fine-tuning after the factorization")
        return self.declare(StepWindow(step, step), replaces_layers=True, channel_multiple=self.round_to)

    @override
    def setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the layers and check explicit ranks."""
        network = self.network_of(pl_module)
        prefix = self.network_name + "."
        selected = select_layers(pl_module, self.include, self.exclude, layer_types=FACTORIZABLE_TYPES)
        outside = [name for name in selected if not name.startswith(prefix)]
        if outside:
            raise ValueError(f"include selects layers {outside} outside the network {self.network_name!r}; "
                             "LowRankFactorization acts on one network (pass network=... or narrow include)")
        grouped = [name for name in selected if not is_factorizable(pl_module.get_submodule(name))]
        if grouped:
            rank_zero_info(f"LowRankFactorization: grouped convolutions left alone: {grouped}")
        self._layers = [uncompiled_name(name[len(prefix):]) for name in selected if name not in grouped]
        if not self._layers:
            raise ValueError(f"no factorizable layer (Linear or ungrouped Conv2d) selected by include={self.include!r}, "
                             f"exclude={self.exclude!r}; selected layers were {selected}")
        if self.ranks is not None:
            self._given_ranks(network)

    def _method(self, layer: nn.Module) -> str:
        return layer_method(layer, self.method)

    def _given_ranks(self, network: nn.Module) -> dict[str, tuple[str, int]]:
        """``{layer: (method, rank)}`` from ``ranks``, each checked against the layer's full rank."""
        patterns = [] if isinstance(self.ranks, int) else list(self.ranks)
        qualified = {name: f"{self.network_name}.{name}" for name in self._layers}
        for pattern in patterns:
            if not any(matches_any(q, [pattern]) for q in qualified.values()):
                raise ValueError(f"ranks key {pattern!r} matches no selected layer; selected layers are "
                                 f"{list(qualified.values())}")
        plan = {}
        for name, full_name in qualified.items():
            if isinstance(self.ranks, int):
                rank = self.ranks
            else:
                key = next((p for p in patterns if matches_any(full_name, [p])), None)
                if key is None:
                    raise ValueError(f"layer {full_name!r} matches no ranks key {patterns}; add a '*' key or "
                                     "exclude the layer")
                rank = self.ranks[key]
            layer = network.get_submodule(name)
            method, limit = self._method(layer), max_rank(layer, self._method(layer))
            if rank > limit:
                raise ValueError(f"ranks: rank {rank} for layer {full_name!r} is larger than possible: {method} of "
                                 f"{layer} allows ranks 1..{limit}")
            plan[name] = (method, rank)
        return plan

    # ----------------------------------------------------------------------------------- planning
    def _options(self, network: nn.Module) -> tuple[list[LayerOptions], int]:
        """Every selected layer's allowed ranks (MACs, error), and the MACs of the rest of the network."""
        geometries = layer_geometries(network, self._layers, self._example)
        layers = []
        for name in self._layers:
            layer = network.get_submodule(name)
            method = self._method(layer)
            errors = truncation_errors(method, layer.weight)
            step = 1 if method == "depthwise_separable" else self.round_to
            options = [Option(r, block_macs(layer, method, r, geometries[name]), float(errors[r - 1]))
                       for r in candidate_ranks(len(errors), step)]
            layers.append(LayerOptions(name, block_macs(layer, None, None, geometries[name]), options))
        fixed = count_macs(network, self._example) - sum(layer.dense_macs for layer in layers)
        return layers, fixed

    def _plan(self, network: nn.Module) -> dict[str, tuple[str, int]]:
        """``{layer: (method, rank)}`` for the layers to factorize now."""
        if self.ranks is not None:
            return self._given_ranks(network)
        layers, fixed = self._options(network)
        if self.target[0] == "energy":
            ranks = allocate_by_energy(layers, self.target[1])
        else:
            try:
                ranks = allocate_by_macs(layers, fixed, self.target[1] * self._dense_macs)
            except ValueError as error:
                raise ValueError(f"kept_macs_ratio={self.target[1]}: {error} of {self._dense_macs} at fit start; "
                                 "factorize more layers (include=...), use a smaller round_to, or another method"
                                 ) from error
        return {name: (self._method(network.get_submodule(name)), rank) for name, rank in ranks.items()}

    # ----------------------------------------------------------------------------------- training
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """On the first batch, measure the network (and check the target); at ``start``, factorize."""
        if self._done or self.window is None:
            return
        network = self.network_of(pl_module)
        if self._example is None:
            called = getattr(pl_module, self.network_name)  # a compiled wrapper's input is its network's input
            self._example = first_sample(capture_network_input(pl_module, called, batch, batch_idx))
            if self._dense_macs is None:
                self._dense_macs = count_macs(network, self._example)
            if self.target[0] == "kept_macs_ratio" and trainer.global_step < self.window.start:
                self._plan(network)  # fails now, not at start, when the target is unreachable
        if trainer.global_step >= self.window.start:
            self._factorize(trainer, pl_module, network)

    def _factorize(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module) -> None:
        plan = self._plan(network) if trainer.is_global_zero else {}
        plan = trainer.strategy.broadcast(plan, src=0)
        self._done = True
        if not plan:
            rank_zero_warn(f"LowRankFactorization: no layer is cheaper factorized at target {self.target}; "
                           "the network stays as it is")
            return
        swap_in_factorized(self, trainer, pl_module, network, plan)
        self._factorized = dict(plan)
        for name, (_, rank) in plan.items():
            pl_module.log(f"factorization/{self.network_name}.{name}/rank", float(rank))
        ratio = count_macs(network, self._example) / self._dense_macs
        pl_module.log("macs/ratio", ratio)
        rank_zero_info(f"LowRankFactorization: {len(plan)} layers factorized ({self.method} for kxk) at step "
                       f"{trainer.global_step}, MACs {ratio:.3f} of fit start")

    # ----------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Whether the factorization happened, its ranks, and the MACs at fit start."""
        return {"done": self._done, "dense_macs": self._dense_macs,
                "factorized": {name: [method, rank] for name, (method, rank) in self._factorized.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; the network was rebuilt from its architecture record before."""
        self._done = state_dict["done"]
        self._dense_macs = state_dict["dense_macs"]
        self._factorized = {name: (method, int(rank)) for name, (method, rank) in state_dict["factorized"].items()}

    @property
    def factorized(self) -> dict[str, tuple[str, int]]:
        """``{layer name (relative to the network): (method, rank)}`` of the layers factorized so far."""
        return dict(self._factorized)
