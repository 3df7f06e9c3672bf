"""MagnitudePruning: gradual magnitude pruning (Zhu & Gupta, 2017) as a Lightning callback.

The callback only orchestrates: *when* (positions resolved to optimizer steps by
:mod:`lightning_compress.core.progress`, amounts by :mod:`~lightning_compress.pruning.schedules`),
*which* layers (:mod:`lightning_compress.core.layers`), *what* to prune
(:mod:`~lightning_compress.pruning.masks`), what to log and what to save.

Mechanism, chosen so that the training step pays almost nothing: no forward hooks and no
re-parametrisation. After every optimizer step the masks are multiplied into the weights in place
(one ``torch._foreach_mul_``), and before every optimizer step into the gradients, so momentum and
weight decay cannot regrow a pruned weight. The model keeps its ordinary parameters and
``state_dict`` keys; a pruned checkpoint loads into the plain model class.

Masks are keyed by qualified parameter name (``model.layer1.0.conv1.weight``). The tensors are
looked up again by name at every use (a walk over ``_modules`` dicts, ~0.1 ms for ResNet-56), so a
callback that replaces modules -- QAT preparation, channel surgery -- never leaves this one
multiplying a stale tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_compress.core.architecture import applied_records, write_records
from lightning_compress.core.composition import Declaration, Effect, check_composition
from lightning_compress.core.guards import check_finite, check_step_loss
from lightning_compress.core.layers import matches_any, resolve_parameters, select_weights, weight_label
from lightning_compress.core.progress import (
    Interval,
    Position,
    StepWindow,
    check_ordered,
    resolve_window,
    step_budget,
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
from lightning_compress.pruning.schedules import ScheduleLike, resolve_schedule

_SCOPES = ("global", "layerwise")
_NORMS = ("l1", "l2")
_NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_PATTERNS = "'unstructured', 'channel' or 'N:M' with integers 0 < N < M (e.g. '2:4')"


def _parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``None`` for unstructured/channel, ``(n, m)`` for an N:M pattern; raises if malformed."""
    if pattern in ("unstructured", "channel"):
        return None
    match = _NM_PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"pattern must be {_PATTERNS}, got {pattern!r}")
    return int(match.group(1)), int(match.group(2))


def _check_amount(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_patterns(patterns: Any, name: str) -> None:
    if patterns is None or isinstance(patterns, str):
        return
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{name} must be a glob pattern or a list of them, got {patterns!r}")


class MagnitudePruning(Callback):
    """Prune a model gradually while it trains, keeping pruned weights exactly zero.

    Between ``start`` and ``end`` the target sparsity follows ``schedule`` from
    ``initial_sparsity`` to ``final_sparsity``; every ``update_every`` optimizer steps (and at
    ``end``) the masks are recomputed from the current weight magnitudes. After ``end`` the masks
    stay enforced while the network fine-tunes. At fit end the masks are dropped: the model holds
    plain tensors with zeros, and a per-layer table is printed (and written to TensorBoard).

    At every mask update, ``sparsity/global`` (zeros over all pruned weights), ``sparsity/target``
    and ``sparsity/<layer>`` are logged through the LightningModule's loggers (also at every
    ``log_every_n_steps`` step). With a ``TensorBoardLogger``, histograms of the remaining weights
    go under ``sparsity/weights/<layer>`` every ``histogram_every`` steps.

    Args:
        final_sparsity: Fraction of weights to prune by ``end``, in ``[0, 1)``; or, with
            ``scope="layerwise"``, a mapping from layer-name glob patterns to per-layer targets (the
            first matching pattern wins; every selected layer must match one). Derived from the
            pattern for N:M (``1 - N/M``) and may then be omitted.
        initial_sparsity: Sparsity the schedule starts from at ``start``, in ``[0, final]``.
        schedule: ``"cubic"`` (Zhu & Gupta), ``"linear"``, ``"exponential"``, ``"constant"``
            (one-shot at ``start``) or a callable ``(progress, initial, final) -> sparsity``.
        start: When pruning begins: a fraction of the run, ``"<n>ep"`` or ``"<n>steps"``.
        end: When the final sparsity is reached, same forms; must come after ``start``.
        update_every: Interval between mask updates: an int of optimizer steps, ``"<n>steps"``,
            ``"<n>ep"`` or a fraction of the run.
        scope: ``"global"`` (one magnitude threshold across all pruned layers) or ``"layerwise"``.
        pattern: ``"unstructured"``, ``"N:M"`` (keep N of every M consecutive input weights, e.g.
            ``"2:4"``) or ``"channel"`` (whole output filters, ranked by ``channel_norm``).
        channel_norm: ``"l1"`` or ``"l2"``, the filter norm for ``pattern="channel"``.
        include: Glob patterns of module names to prune (or parameter names, for weight matrices that
            are not a layer's ``weight``, e.g. ``"*.in_proj_weight"``); default: every Conv/Linear
            weight and attention projection except the first conv and the last Linear (see
            :func:`lightning_compress.core.layers.select_weights`).
        exclude: Glob patterns of module (or parameter) names to leave dense.
        histogram_every: Optimizer steps between weight histograms (TensorBoard only); ``None``: off.

    Raises:
        ValueError: On any invalid argument, before training.

    Example:
        >>> import lightning.pytorch as pl
        >>> pruning = MagnitudePruning(final_sparsity=0.9, end=0.75, update_every=50)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[pruning], logger=False)
    """

    def __init__(
        self,
        final_sparsity: Union[float, dict[str, float], None] = None,
        initial_sparsity: float = 0.0,
        schedule: ScheduleLike = "cubic",
        start: Position = 0.0,
        end: Position = 0.75,
        update_every: Interval = 100,
        scope: str = "global",
        pattern: str = "unstructured",
        channel_norm: str = "l1",
        include: Union[str, list[str], None] = None,
        exclude: Union[str, list[str], None] = None,
        histogram_every: Optional[int] = None,
    ) -> None:
        self._nm = _parse_pattern(pattern)
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        if channel_norm not in _NORMS:
            raise ValueError(f"channel_norm must be one of {_NORMS}, got {channel_norm!r}")
        if self._nm is not None:
            nm_sparsity = 1.0 - self._nm[0] / self._nm[1]
            if final_sparsity is None:
                final_sparsity = nm_sparsity
            elif isinstance(final_sparsity, Mapping) or not math.isclose(final_sparsity, nm_sparsity):
                raise ValueError(f"pattern={pattern!r} fixes final_sparsity to {nm_sparsity:g}; "
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
        _check_patterns(include, "include")
        _check_patterns(exclude, "exclude")
        self.update_every = update_every
        self.scope = scope
        self.pattern = pattern
        self.channel_norm = channel_norm
        self.include = include
        self.exclude = exclude
        self.histogram_every = histogram_every
        self._finals_by_pattern = finals

        self._layers: list[str] = []  # module names, in model order
        self._names: list[str] = []  # their weights' qualified parameter names
        self._paths: list[list[str]] = []
        self._final_per_name: dict[str, float] = {}
        self._window = StepWindow(0, 0)
        self._factors: dict[str, Tensor] = {}  # mask per parameter name, 1/0 in the weight's dtype
        self._last_update_step: int | None = None
        self._stepped: int | None = None
        self._target = 0.0
        self._stats: dict[str, float] = {}
        self._pending_state: dict[str, Any] | None = None
        self._selected_at = 0  # architecture records applied when the weights were selected

    @property
    def state_key(self) -> str:
        """Distinguishes instances by the layers they prune, so that a resumed run may change targets."""
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks (``bool``, ``True`` = kept) by parameter name; empty before the first
        update and after fit end."""
        return {name: factor != 0 for name, factor in self._factors.items()}

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Select the layers and check the per-layer targets against them (stage ``"fit"`` only)."""
        if stage != "fit":
            return
        if any(isinstance(cb, ModelPruning) for cb in trainer.callbacks):
            raise ValueError("MagnitudePruning cannot be combined with Lightning's ModelPruning: both "
                             "prune the same weights; use one of them")
        self._select(pl_module)
        self._window = resolve_window(step_budget(trainer), self.start, self.end, self.update_every)
        check_composition(trainer)

    def _select(self, pl_module: pl.LightningModule) -> None:
        """Select the weights and their targets; noted against the architecture records applied so far."""
        self._names = select_weights(pl_module, self.include, self.exclude)
        self._layers = [weight_label(name) for name in self._names]
        self._paths = [name.split(".") for name in self._names]
        self._final_per_name = self._assign_finals()
        if self._nm is not None:
            for layer, name in zip(self._layers, self._names):
                check_nm_compatible(pl_module.get_parameter(name).shape, self._nm[1], layer)
        self._selected_at = len(applied_records(pl_module))

    def _follow_architecture(self, pl_module: pl.LightningModule) -> None:
        """Select again when an architecture changer replaced layers (a checkpoint replay, a factorization)
        before the first mask: composition guarantees masking starts only after such a change."""
        if not self._factors and len(applied_records(pl_module)) != self._selected_at:
            self._select(pl_module)

    def compression_declaration(self, trainer: pl.Trainer) -> Declaration:
        """Masks weights from ``start`` on (masks stay enforced until fit end).

        Args:
            trainer: The trainer about to fit.

        Returns:
            The declaration :func:`~lightning_compress.core.composition.check_composition` reads.
        """
        window = resolve_window(step_budget(trainer), self.start, self.end, self.update_every)
        return Declaration(type(self).__name__, Effect.MASKS, window, {"nm": self._nm, "layers": list(self._layers)})

    def _assign_finals(self) -> dict[str, float]:
        patterns = list(self._finals_by_pattern)
        for pattern in patterns:
            if not any(matches_any(layer, [pattern]) for layer in self._layers):
                raise ValueError(f"final_sparsity key {pattern!r} matches no pruned layer; pruned layers "
                                 f"are: {self._layers}")
        finals = {}
        for layer, name in zip(self._layers, self._names):
            key = next((p for p in patterns if matches_any(layer, [p])), None)
            if key is None:
                raise ValueError(f"layer {layer!r} matches no final_sparsity key {patterns}; add a '*' "
                                 f"key for a default target or exclude the layer")
            finals[name] = self._finals_by_pattern[key]
        return finals

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Detect pruning callbacks that overlap this one."""
        for other in trainer.callbacks:
            if other is not self and isinstance(other, MagnitudePruning):
                shared = sorted(set(other._layers) & set(self._layers))
                if shared:
                    raise ValueError(f"two MagnitudePruning callbacks prune the same layers {shared}; give "
                                     "them disjoint include/exclude patterns")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install masks restored from a checkpoint and make sure the weights obey them."""
        self._follow_architecture(pl_module)
        params = self._resolve(pl_module)
        if self._pending_state is not None:
            self._install(self._pending_state, params)
            self._pending_state = None
        self._enforce(params)
        self._stepped = trainer.global_step

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Run the update due at ``start`` before the first forward (e.g. one-shot at step 0)."""
        self._maybe_update(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Zero the gradients of pruned weights so that optimizer state cannot regrow them."""
        if not self._factors:
            return
        params = self._resolve(pl_module)
        self._follow_shapes(params)
        pairs = [(p.grad, self._factor_for(name, p.grad)) for name, p in zip(self._names, params)
                 if p.grad is not None]
        if pairs:
            grads, factors = zip(*pairs)
            torch._foreach_mul_(list(grads), list(factors))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After each optimizer step: re-apply masks, update them when due, log."""
        step = trainer.global_step
        if step == self._stepped:  # accumulating gradients: no optimizer step happened
            return
        self._stepped = step
        if step >= self._window.start:
            check_step_loss(trainer, outputs, type(self).__name__)
        if self._factors:
            params = self._resolve(pl_module)
            self._follow_shapes(params)
            self._enforce(params)
        updated = self._maybe_update(trainer, pl_module)
        if not self._factors:
            return
        if not updated and trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:
            self._log(pl_module)
        if self.histogram_every and step % self.histogram_every == 0 and trainer.is_global_zero:
            self._log_histograms(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Leave plain zeros in the weights, report the per-layer table, drop the masks."""
        params = self._resolve(pl_module)
        if self._factors:
            self._enforce(params)
        table = self._summary_table(params)
        rank_zero_info(f"MagnitudePruning: final sparsity per layer\n{table}")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("sparsity/summary", table, trainer.global_step)
                    logger.experiment.flush()
        self._factors = {}
        self._stats = {}

    # ------------------------------------------------------------------ checkpointing
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Write the module's architecture records, so that a masked, reshaped network reloads."""
        write_records(pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """Masks packed to 1 bit per weight, with their shapes, and the step of the last update."""
        return {
            "last_update_step": self._last_update_step,
            "target": self._target,
            "masks": {name: pack_mask(factor != 0) for name, factor in self._factors.items()},
            "shapes": {name: list(factor.shape) for name, factor in self._factors.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's masks until the model's tensors are known (``on_train_start``)."""
        self._pending_state = state_dict

    def _install(self, state: dict[str, Any], params: list[Tensor]) -> None:
        by_name = dict(zip(self._names, params))
        masks, shapes = state["masks"], state["shapes"]
        unknown = sorted(set(masks) - set(by_name))
        if unknown:
            raise ValueError(f"checkpoint has masks for {unknown}, which this run does not prune; pruned "
                             f"layers are: {self._layers}")
        if masks and set(masks) != set(by_name):
            raise ValueError(f"checkpoint has no masks for {sorted(set(by_name) - set(masks))}; it was saved "
                             "with a different layer selection")
        factors = {}
        for name, packed in masks.items():
            layer = name.rsplit(".", 1)[0]
            if tuple(shapes[name]) != tuple(by_name[name].shape):
                raise ValueError(f"checkpoint mask for layer {layer!r} has shape {tuple(shapes[name])}, "
                                 f"but the model's weight has shape {tuple(by_name[name].shape)}")
            factors[name] = unpack_mask(packed, shapes[name]).to(by_name[name])
        self._factors = factors
        self._last_update_step = state["last_update_step"]
        self._target = state["target"]
        if factors:
            self._stats = self._measure(params)

    # ------------------------------------------------------------------ mechanics
    def _resolve(self, pl_module: pl.LightningModule) -> list[Tensor]:
        """The current weight tensors, looked up by name (never a cached, possibly stale tensor)."""
        try:
            params = []
            for path in self._paths:
                module = pl_module
                for part in path[:-1]:
                    module = module._modules[part]
                params.append(module._parameters[path[-1]])
            return params
        except (KeyError, AttributeError):
            resolve_parameters(pl_module, self._names)  # raises, naming the missing parameters
            raise

    def _follow_shapes(self, params: list[Tensor]) -> None:
        """Cut masks to weights that an architecture change (channel removal) made smaller.

        Pruned weights are exact zeros (masks are enforced after every optimizer step), so the mask of
        the surviving rows and columns is read back from the surviving weights themselves.
        """
        for name, param in zip(self._names, params):
            factor = self._factors.get(name)
            if factor is not None and factor.shape != param.shape:
                self._factors[name] = (param.detach() != 0).to(param)

    def _factor_for(self, name: str, like: Tensor) -> Tensor:
        factor = self._factors[name]
        if factor.dtype != like.dtype or factor.device != like.device:
            factor = self._factors[name] = factor.to(like)
        return factor

    @torch.no_grad()
    def _enforce(self, params: list[Tensor]) -> None:
        if self._factors:
            torch._foreach_mul_(params, [self._factor_for(n, p) for n, p in zip(self._names, params)])

    def _is_update_step(self, step: int) -> bool:
        return self._window.is_update_step(step)

    def _maybe_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        step = trainer.global_step
        if step == self._last_update_step or not self._is_update_step(step):
            return False
        self._follow_architecture(pl_module)
        params = self._resolve(pl_module)
        weights = dict(zip(self._names, params))
        progress = (step - self._window.start) / (self._window.end - self._window.start)
        masks = self._compute_masks(weights, progress)
        if trainer.world_size > 1:  # every rank takes rank 0's masks: identical by construction
            packed = trainer.strategy.broadcast({n: pack_mask(m) for n, m in masks.items()}, src=0)
            masks = {n: unpack_mask(packed[n], weights[n].shape) for n in self._names}
        self._factors = {n: masks[n].to(weights[n]) for n in self._names}
        self._last_update_step = step
        self._enforce(params)
        check_finite(weights, step, type(self).__name__)
        self._stats = self._measure(params)
        self._log(pl_module)
        return True

    def _compute_masks(self, weights: dict[str, Tensor], progress: float) -> dict[str, Tensor]:
        targets = {n: self.schedule(progress, self.initial_sparsity, final)
                   for n, final in self._final_per_name.items()}
        if self.scope == "global":
            self._target = self.schedule(progress, self.initial_sparsity, self._finals_by_pattern["*"])
        else:
            numel = {n: w.numel() for n, w in weights.items()}
            self._target = sum(targets[n] * numel[n] for n in weights) / sum(numel.values())
        if self.pattern == "channel":
            return channel_masks(weights, targets if self.scope == "layerwise" else self._target, self.scope,
                                 self.channel_norm)
        scores = weights if self._nm is None else {n: nm_scores(w, *self._nm) for n, w in weights.items()}
        if self.scope == "global":
            return global_magnitude_masks(scores, self._target)
        return layerwise_magnitude_masks(scores, targets)

    def _measure(self, params: list[Tensor]) -> dict[str, float]:
        zeros = torch.stack([(p.detach() == 0).sum() for p in params]).tolist()
        sizes = [p.numel() for p in params]
        stats = {"sparsity/global": sum(zeros) / sum(sizes), "sparsity/target": self._target}
        stats.update({f"sparsity/{layer}": z / s for layer, z, s in zip(self._layers, zeros, sizes)})
        return stats

    def _log(self, pl_module: pl.LightningModule) -> None:
        pl_module.log_dict(self._stats, on_step=True, on_epoch=False, batch_size=1)

    def _log_histograms(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        for layer, param in zip(self._layers, self._resolve(pl_module)):
            kept = param.detach()[param.detach() != 0].float().cpu()
            if kept.numel():
                for logger in loggers:
                    logger.experiment.add_histogram(f"sparsity/weights/{layer}", kept, trainer.global_step)

    def _summary_table(self, params: list[Tensor]) -> str:
        lines = ["| layer | shape | params | zeros | sparsity |", "|---|---|---:|---:|---:|"]
        total = total_zeros = 0
        for layer, param in zip(self._layers, params):
            zeros = int((param.detach() == 0).sum())
            total, total_zeros = total + param.numel(), total_zeros + zeros
            shape = "x".join(map(str, param.shape))
            lines.append(f"| {layer} | {shape} | {param.numel()} | {zeros} | {zeros / param.numel():.2%} |")
        lines.append(f"| **total** | | {total} | {total_zeros} | {total_zeros / max(total, 1):.2%} |")
        return "\n".join(lines)
