"""MagnitudePruning: gradual magnitude pruning (Zhu & Gupta, 2017) as a Lightning callback.

Masks multiply the weights after every optimizer step and their gradients before it, so the model
keeps ordinary parameters (a pruned checkpoint loads into the plain class) and optimizer state
cannot regrow a pruned weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_compress.core.architecture import applied_records
from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.composition import Declaration, Effect
from lightning_compress.core.guards import check_finite
from lightning_compress.core.layers import matches_any, resolve_parameters, select_weights, weight_label
from lightning_compress.core.progress import (
    Interval,
    Position,
    StepBudget,
    StepWindow,
    check_ordered,
    resolve_window,
    validate_interval,
    validate_position,
)
from lightning_compress.pruning.masks import (
    channel_masks,
    check_nm_compatible,
    global_magnitude_masks,
    layerwise_magnitude_masks,
    nm_scores,
    pack_mask,
    unpack_mask,
)
from lightning_compress.pruning.patterns import NM, Channel, PatternLike, parse_pattern
from lightning_compress.pruning.schedules import ScheduleLike, resolve_schedule

_SCOPES = ("global", "layerwise")
_NORMS = ("l1", "l2")


def _check_amount(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_globs(patterns: Any, name: str) -> None:
    if patterns is None or isinstance(patterns, str):
        return
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{name} must be a glob pattern or a list of them, got {patterns!r}")


@dataclass
class PrunedWeight:
    """One pruned weight: where it lives, its target and its current mask.

    Args:
        name: Qualified parameter name (``model.layer1.0.conv1.weight``).
        label: Name in logs, errors and ``final_sparsity`` keys (``model.layer1.0.conv1``).
        final: Its final sparsity.
        factor: The mask as 1/0 in the weight's dtype and device; ``None`` while unmasked.
    """

    name: str
    label: str
    final: float
    factor: Optional[Tensor] = None
    path: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = tuple(self.name.split("."))


class MagnitudePruning(CompressionCallback):
    """Prune a model gradually while it trains, keeping pruned weights exactly zero.

    Between ``start`` and ``end`` the target sparsity follows ``schedule`` from ``initial_sparsity`` to
    ``final_sparsity``; masks are recomputed from weight magnitudes every ``update_every`` and stay
    enforced afterwards. At fit end the masks are dropped, leaving plain tensors with zeros, and a
    per-layer table is printed. Logs ``sparsity/global``, ``sparsity/target`` and ``sparsity/<layer>``;
    with a ``TensorBoardLogger``, weight histograms under ``sparsity/weights/<layer>``.

    Args:
        final_sparsity: Fraction of weights pruned by ``end``, in ``[0, 1)``; with ``scope="layerwise"``
            also ``{layer glob: target}`` (first match wins, every layer must match). Implied by N:M.
        initial_sparsity: Sparsity at ``start``, in ``[0, final]``.
        schedule: ``"cubic"``, ``"linear"``, ``"exponential"``, ``"constant"`` (one-shot at ``start``)
            or a callable ``(progress, initial, final) -> sparsity``.
        start: When pruning begins: a fraction of the run, ``"<n>ep"`` or ``"<n>steps"``.
        end: When ``final_sparsity`` is reached, in the same forms, after ``start``.
        update_every: Interval between mask updates: optimizer steps (int), ``"<n>steps"``, ``"<n>ep"``
            or a fraction of the run.
        scope: ``"global"`` (one threshold across layers) or ``"layerwise"``.
        pattern: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``, along the input dimension), ``"channel"``
            (whole filters) or a :mod:`~lightning_compress.pruning.patterns` type; kept parsed.
        channel_norm: ``"l1"`` or ``"l2"``, the filter norm for ``pattern="channel"``.
        include: Globs of module names (or parameter names, e.g. ``"*.in_proj_weight"``) to prune;
            default: what :func:`lightning_compress.core.layers.select_weights` selects.
        exclude: Globs of module (or parameter) names to leave dense.
        histogram_every: Optimizer steps between weight histograms (TensorBoard); ``None``: off.

    Example:
        >>> import lightning.pytorch as pl
        >>> pruning = MagnitudePruning(pattern="2:4", end=0.75, update_every=50)
        >>> print(pruning.pattern, pruning.final_sparsity)
        2:4 0.5
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[pruning], logger=False)
    """

    effect = Effect.MASKS
    acts_on_network = False
    guards_loss = True

    def __init__(
        self,
        final_sparsity: Union[float, dict[str, float], None] = None,
        initial_sparsity: float = 0.0,
        schedule: ScheduleLike = "cubic",
        start: Position = 0.0,
        end: Position = 0.75,
        update_every: Interval = 100,
        scope: str = "global",
        pattern: PatternLike = "unstructured",
        channel_norm: str = "l1",
        include: Union[str, list[str], None] = None,
        exclude: Union[str, list[str], None] = None,
        histogram_every: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.pattern = parse_pattern(pattern)
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        if channel_norm not in _NORMS:
            raise ValueError(f"channel_norm must be one of {_NORMS}, got {channel_norm!r}")
        if isinstance(self.pattern, NM):
            fixed = self.pattern.sparsity
            if final_sparsity is None:
                final_sparsity = fixed
            elif isinstance(final_sparsity, Mapping) or not math.isclose(final_sparsity, fixed):
                raise ValueError(f"pattern='{self.pattern}' fixes final_sparsity to {fixed:g}; "
                                 f"leave final_sparsity unset, got {final_sparsity!r}")
        if final_sparsity is None:
            raise ValueError("final_sparsity is required: a number in [0, 1) or a mapping from "
                             "layer-name patterns to numbers in [0, 1)")
        self.initial_sparsity = _check_amount(initial_sparsity, "initial_sparsity")
        if isinstance(final_sparsity, Mapping):
            if not final_sparsity:
                raise ValueError("final_sparsity mapping must not be empty")
            if scope != "layerwise":
                raise ValueError("per-layer final_sparsity (a mapping) needs scope='layerwise', "
                                 f"got scope={scope!r}")
            finals = {str(key): _check_amount(value, f"final_sparsity[{key!r}]")
                      for key, value in final_sparsity.items()}
        else:
            finals = {"*": _check_amount(final_sparsity, "final_sparsity")}
        for key, value in finals.items():
            if self.initial_sparsity > value:
                raise ValueError(f"initial_sparsity ({self.initial_sparsity}) must not exceed final_sparsity "
                                 f"({value}{'' if key == '*' else f' for {key!r}'})")
        self.final_sparsity = final_sparsity
        self.schedule = resolve_schedule(schedule)
        self.start = validate_position(start, "start")
        self.end = validate_position(end, "end")
        check_ordered(self.start, self.end, "start", "end")
        validate_interval(update_every, "update_every")
        if histogram_every is not None and (
            isinstance(histogram_every, bool) or not isinstance(histogram_every, int) or histogram_every <= 0
        ):
            raise ValueError(f"histogram_every must be a positive integer or None, got {histogram_every!r}")
        _check_globs(include, "include")
        _check_globs(exclude, "exclude")
        self.update_every = update_every
        self.scope = scope
        self.channel_norm = channel_norm
        self.include = include
        self.exclude = exclude
        self.histogram_every = histogram_every
        self._finals_by_pattern = finals

        self._weights: list[PrunedWeight] = []  # in model order
        self._last_update_step: int | None = None
        self._stepped: int | None = None
        self._target = 0.0
        self._stats: dict[str, float] = {}
        self._pending_state: dict[str, Any] | None = None
        self._selected_at = 0  # architecture records applied when the weights were selected

    @property
    @override
    def state_key(self) -> str:
        """Distinguishes instances by the layers they prune, so that a resumed run may change targets."""
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks (``True`` = kept) by parameter name; empty when unmasked."""
        return {w.name: w.factor != 0 for w in self._weights if w.factor is not None}

    @property
    def _names(self) -> list[str]:
        """Qualified names of the pruned weights, in model order."""
        return [w.name for w in self._weights]

    @property
    def _window(self) -> StepWindow | None:
        """The pruning window (the base's :attr:`window`), under the name tests read."""
        return self.window

    @property
    def _masked(self) -> bool:
        """Whether masks are set (all pruned weights have one, or none has)."""
        return any(w.factor is not None for w in self._weights)

    # ------------------------------------------------------------------ set-up
    @override
    def declaration(self, budget: StepBudget) -> Declaration:
        """Masks weights from ``start`` to fit end; an N:M pattern is declared as ``nm``."""
        nm = (self.pattern.n, self.pattern.m) if isinstance(self.pattern, NM) else None
        return self.declare(resolve_window(budget, self.start, self.end, self.update_every), nm=nm)

    @override
    def setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse Lightning's ModelPruning beside it; select the weights and check their targets."""
        if any(isinstance(cb, ModelPruning) for cb in trainer.callbacks):
            raise ValueError("MagnitudePruning cannot be combined with Lightning's ModelPruning: both "
                             "prune the same weights; use one of them")
        self._select(pl_module)

    def _select(self, pl_module: pl.LightningModule) -> None:
        """Select the weights and their targets; noted against the architecture records applied so far."""
        names = select_weights(pl_module, self.include, self.exclude)
        labels = [weight_label(name) for name in names]
        finals = self._assign_finals(labels)
        self._weights = [PrunedWeight(*fields) for fields in zip(names, labels, finals)]
        if isinstance(self.pattern, NM):
            for weight in self._weights:
                check_nm_compatible(pl_module.get_parameter(weight.name).shape, self.pattern.m, weight.label)
        self._selected_at = len(applied_records(pl_module))

    def _follow_architecture(self, pl_module: pl.LightningModule) -> None:
        """Select again if layers were replaced before the first mask (composition allows only that).

        Not when a checkpoint's pending masks name the weights selected: a replacement after the masks (a PT2E
        graph, which has no layer modules left) keeps the weights under the same names. Masks naming other weights
        were taken after a replacement the checkpoint rebuilds (a factorization), so the selection follows it.
        """
        pending = set((self._pending_state or {}).get("masks") or ())
        if self._masked or len(applied_records(pl_module)) == self._selected_at or pending == set(self._names):
            return
        self._select(pl_module)

    def _assign_finals(self, labels: list[str]) -> list[float]:
        """The final sparsity of each layer: the first ``final_sparsity`` key its label matches."""
        patterns = list(self._finals_by_pattern)
        for pattern in patterns:
            if not any(matches_any(label, [pattern]) for label in labels):
                raise ValueError(f"final_sparsity key {pattern!r} matches no pruned layer; pruned layers "
                                 f"are: {labels}")
        finals = []
        for label in labels:
            key = next((p for p in patterns if matches_any(label, [p])), None)
            if key is None:
                raise ValueError(f"layer {label!r} matches no final_sparsity key {patterns}; add a '*' "
                                 f"key for a default target or exclude the layer")
            finals.append(self._finals_by_pattern[key])
        return finals

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the start line; refuse pruning callbacks that overlap this one."""
        super().on_fit_start(trainer, pl_module)
        mine = {w.label for w in self._weights}
        for other in trainer.callbacks:
            if other is not self and isinstance(other, MagnitudePruning):
                shared = sorted(mine & {w.label for w in other._weights})
                if shared:
                    raise ValueError(f"two MagnitudePruning callbacks prune the same layers {shared}; give "
                                     "them disjoint include/exclude patterns")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install masks restored from a checkpoint and make sure the weights obey them."""
        super().on_train_start(trainer, pl_module)
        self._follow_architecture(pl_module)
        params = self._resolve(pl_module)
        if self._pending_state is not None:
            self._install(self._pending_state, params)
            self._pending_state = None
        self._enforce(params)
        self._stepped = trainer.global_step

    # ------------------------------------------------------------------ training
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Run the update due at ``start`` before the first forward (e.g. one-shot at step 0)."""
        self._maybe_update(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Zero the gradients of pruned weights so that optimizer state cannot regrow them."""
        if not self._masked:
            return
        params = self._resolve(pl_module)
        self._follow_shapes(params)
        pairs = [(p.grad, self._factor_for(w, p.grad)) for w, p in zip(self._weights, params)
                 if p.grad is not None]
        if pairs:
            grads, factors = zip(*pairs)
            torch._foreach_mul_(list(grads), list(factors))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After each optimizer step: check the loss, re-apply masks, update them when due, log."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if step == self._stepped:  # accumulating gradients: no optimizer step happened
            return
        self._stepped = step
        if self._masked:
            params = self._resolve(pl_module)
            self._follow_shapes(params)
            self._enforce(params)
        updated = self._maybe_update(trainer, pl_module)
        if not self._masked:
            return
        if not updated and trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:
            self._log(pl_module)
        if self.histogram_every and step % self.histogram_every == 0 and trainer.is_global_zero:
            self._log_histograms(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Leave plain zeros in the weights, report the per-layer table, drop the masks."""
        self._follow_architecture(pl_module)  # a finished run resumed skips on_train_start
        params = self._resolve(pl_module)
        self._enforce(params)
        table = self._summary_table(params)
        rank_zero_info(f"MagnitudePruning: final sparsity per layer\n{table}")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("sparsity/summary", table, trainer.global_step)
                    logger.experiment.flush()
        for weight in self._weights:
            weight.factor = None
        self._stats = {}

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        """Masks packed to 1 bit per weight, with their shapes, and the step of the last update."""
        masked = [w for w in self._weights if w.factor is not None]
        return {
            "last_update_step": self._last_update_step,
            "target": self._target,
            "masks": {w.name: pack_mask(w.factor != 0) for w in masked},
            "shapes": {w.name: list(w.factor.shape) for w in masked},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's masks until the model's tensors are known (``on_train_start``)."""
        self._pending_state = state_dict

    def _install(self, state: dict[str, Any], params: list[Tensor]) -> None:
        masks, shapes = state["masks"], state["shapes"]
        names = set(self._names)
        unknown = sorted(set(masks) - names)
        if unknown:
            raise ValueError(f"checkpoint has masks for {unknown}, which this run does not prune; pruned "
                             f"layers are: {[w.label for w in self._weights]}")
        if masks and set(masks) != names:
            raise ValueError(f"checkpoint has no masks for {sorted(names - set(masks))}; it was saved "
                             "with a different layer selection")
        factors = {}
        for weight, param in zip(self._weights, params):
            if weight.name in masks:
                shape = tuple(shapes[weight.name])
                if shape != tuple(param.shape):
                    raise ValueError(f"checkpoint mask for layer {weight.label!r} has shape {shape}, "
                                     f"but the model's weight has shape {tuple(param.shape)}")
                factors[weight.name] = unpack_mask(masks[weight.name], shape).to(param)
        for weight in self._weights:
            weight.factor = factors.get(weight.name)
        self._last_update_step = state["last_update_step"]
        self._target = state["target"]
        if masks:
            self._stats = self._measure(params)

    # ------------------------------------------------------------------ mechanics
    def _resolve(self, pl_module: pl.LightningModule) -> list[Tensor]:
        """The current weight tensors, looked up by name (never a cached, possibly stale tensor)."""
        try:
            params = []
            for weight in self._weights:
                module = pl_module
                for part in weight.path[:-1]:
                    module = module._modules[part]
                params.append(module._parameters[weight.path[-1]])
            return params
        except (KeyError, AttributeError):
            resolve_parameters(pl_module, self._names)  # raises, naming the missing parameters
            raise

    def _follow_shapes(self, params: list[Tensor]) -> None:
        """Cut masks to weights a channel removal made smaller: pruned weights are exact zeros."""
        for weight, param in zip(self._weights, params):
            if weight.factor is not None and weight.factor.shape != param.shape:
                weight.factor = (param.detach() != 0).to(param)

    @staticmethod
    def _factor_for(weight: PrunedWeight, like: Tensor) -> Tensor:
        """The (set) mask factor of ``weight``, moved once to ``like``'s dtype and device."""
        if weight.factor.dtype != like.dtype or weight.factor.device != like.device:
            weight.factor = weight.factor.to(like)
        return weight.factor

    @torch.no_grad()
    def _enforce(self, params: list[Tensor]) -> None:
        if self._masked:
            torch._foreach_mul_(params, [self._factor_for(w, p) for w, p in zip(self._weights, params)])

    def _maybe_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        step, window = trainer.global_step, self.window
        if step == self._last_update_step or window is None or not window.is_update_step(step):
            return False
        self._follow_architecture(pl_module)
        params = self._resolve(pl_module)
        weights = {w.name: p for w, p in zip(self._weights, params)}
        progress = (step - window.start) / (window.end - window.start)
        masks = self._compute_masks(weights, progress)
        if trainer.world_size > 1:  # every rank takes rank 0's masks: identical by construction
            packed = trainer.strategy.broadcast({n: pack_mask(m) for n, m in masks.items()}, src=0)
            masks = {n: unpack_mask(packed[n], w.shape) for n, w in weights.items()}
        for weight, param in zip(self._weights, params):
            weight.factor = masks[weight.name].to(param)
        self._last_update_step = step
        self._enforce(params)
        check_finite(weights, step, type(self).__name__)
        self._stats = self._measure(params)
        self._log(pl_module)
        return True

    def _compute_masks(self, weights: dict[str, Tensor], progress: float) -> dict[str, Tensor]:
        targets = {w.name: self.schedule(progress, self.initial_sparsity, w.final) for w in self._weights}
        if self.scope == "global":
            self._target = self.schedule(progress, self.initial_sparsity, self._finals_by_pattern["*"])
        else:
            numel = {n: w.numel() for n, w in weights.items()}
            self._target = sum(targets[n] * numel[n] for n in weights) / sum(numel.values())
        if isinstance(self.pattern, Channel):
            return channel_masks(weights, targets if self.scope == "layerwise" else self._target, self.scope,
                                 self.channel_norm)
        pattern = self.pattern
        scores = ({n: nm_scores(w, pattern.n, pattern.m) for n, w in weights.items()}
                  if isinstance(pattern, NM) else weights)
        if self.scope == "global":
            return global_magnitude_masks(scores, self._target)
        return layerwise_magnitude_masks(scores, targets)

    def _measure(self, params: list[Tensor]) -> dict[str, float]:
        zeros = torch.stack([(p.detach() == 0).sum() for p in params]).tolist()
        sizes = [p.numel() for p in params]
        stats = {"sparsity/global": sum(zeros) / sum(sizes), "sparsity/target": self._target}
        stats.update({f"sparsity/{w.label}": z / s for w, z, s in zip(self._weights, zeros, sizes)})
        return stats

    def _log(self, pl_module: pl.LightningModule) -> None:
        pl_module.log_dict(self._stats, on_step=True, on_epoch=False, batch_size=1)

    def _log_histograms(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        for weight, param in zip(self._weights, self._resolve(pl_module)):
            kept = param.detach()[param.detach() != 0].float().cpu()
            if kept.numel():
                for logger in loggers:
                    logger.experiment.add_histogram(f"sparsity/weights/{weight.label}", kept,
                                                    trainer.global_step)

    def _summary_table(self, params: list[Tensor]) -> str:
        lines = ["| layer | shape | params | zeros | sparsity |", "|---|---|---:|---:|---:|"]
        total = total_zeros = 0
        for weight, param in zip(self._weights, params):
            size, zeros = param.numel(), int((param.detach() == 0).sum())
            total, total_zeros = total + size, total_zeros + zeros
            shape = "x".join(map(str, param.shape))
            lines.append(f"| {weight.label} | {shape} | {size} | {zeros} | {zeros / size:.2%} |")
        lines.append(f"| **total** | | {total} | {total_zeros} | {total_zeros / max(total, 1):.2%} |")
        return "\n".join(lines)
