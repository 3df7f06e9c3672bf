"""Post-training quantization: static (calibrated) and dynamic int8, as functions and as a callback.

Static PTQ observes activation ranges on a few batches and converts; no training. It is the cheap
baseline QAT is measured against (MobileNetV2's depthwise layers are its known weak spot). Dynamic
quantization needs no data at all and only changes ``nn.Linear`` (and RNN) layers: the choice for
Linear-heavy models. Both share :mod:`~lightning_compress.quantization.prepare` and
:mod:`~lightning_compress.quantization.convert` with QAT.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import fx, nn
from typing_extensions import override

from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.composition import Declaration, Effect
from lightning_compress.core.inputs import capture_network_input
from lightning_compress.core.layers import find_network, is_compiled, unwrap_compiled
from lightning_compress.core.progress import StepBudget, StepWindow
from lightning_compress.quantization.check import ConversionError
from lightning_compress.quantization.convert import convert
from lightning_compress.quantization.engines import DEFAULT_ENGINE, Engine, check_engine
from lightning_compress.quantization.families import ALL_FAMILIES, family_of
from lightning_compress.quantization.prepare import UNCOMPILED_NOTE, prepare, resolve_skip


def quantize_static(
    network: nn.Module,
    batches: Iterable[tuple],
    engine: str = DEFAULT_ENGINE,
    skip: str | Sequence[str] | None = None,
    check: bool = True,
) -> nn.Module:
    """Static int8 post-training quantization: calibrate on ``batches``, then convert.

    ``network`` is left unchanged (a copy is quantized; of a ``torch.compile`` wrapper, the module inside).

    Args:
        network: The fp32 network.
        batches: Iterable of positional-input tuples, e.g. ``[(images,), ...]`` (a few dozen suffice).
        engine: One of :data:`~lightning_compress.quantization.engines.ENGINES` (``"x86_inductor"``: exported
            with ``torch.export`` on the first batch's shapes, ``[pt2e]`` extra).
        skip: Glob patterns of module names (relative to ``network``) kept in fp32.
        check: Run the int8 model on the first batch and compare it with the fake-quant one. ``False`` only for a
            model that is timed, not used: e.g. the planner's randomly initialized narrow networks, whose
            near-constant logits any kernel's rounding reorders.

    Returns:
        The int8 network (CPU, eval mode); for the ONNX engines an
        :class:`~lightning_compress.core.onnx.OnnxRuntimeNetwork` running the QDQ ONNX model; for ``x86_inductor``
        the quantize/dequantize graph; for ``xnnpack`` an :class:`~lightning_compress.core.executorch.ExecuTorchNetwork`
        running the ExecuTorch program.

    Raises:
        ValueError: On an unknown engine, an untraceable network, or no calibration batch.
        ConversionError: With ``check``, if the int8 model fails on the first calibration batch or computes
            something else than the fake-quant model (the message names the module and the ``skip`` pattern).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        >>> int8 = quantize_static(net, [(torch.randn(4, 3, 8, 8),)])
        >>> int8(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 2])
    """
    network = unwrap_compiled(network)
    skip_names = resolve_skip(network, [skip] if isinstance(skip, str) else list(skip or []))
    return _calibrate_and_convert(network, batches, engine, skip_names, check=check)


def _calibrate_and_convert(
    network: nn.Module, batches: Iterable[tuple], engine: str | Engine, skip_names: Sequence[str], prefix: str = "",
    check: bool = True,
) -> nn.Module:
    """Calibrate a copy, convert it, and check the int8 model on the first batch (its engine's family)."""
    return family_of(engine).calibrate_and_convert(network, batches, skip_names, prefix, check)


def quantize_dynamic(
    network: nn.Module, engine: str = "x86", skip: str | Sequence[str] | None = None
) -> fx.GraphModule:
    """Dynamic int8 quantization of ``nn.Linear`` layers: weights int8 per-channel, activations
    quantized on the fly per batch; no calibration data. ``network`` is left unchanged.

    Args:
        network: The fp32 network.
        engine: One of :data:`~lightning_compress.quantization.engines.ENGINES`.
        skip: Glob patterns of module names (relative to ``network``) kept in fp32.

    Returns:
        The quantized network (CPU, eval mode).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> type(quantize_dynamic(net).get_submodule("2")).__name__
        'Linear'
    """
    engine = check_engine(engine)
    network = unwrap_compiled(network)
    skip_names = resolve_skip(network, [skip] if isinstance(skip, str) else list(skip or []))
    prepared = prepare(copy.deepcopy(network).cpu(), engine, mode="dynamic", skip=skip_names)
    return convert(prepared, engine)


class PostTrainingQuantization(CompressionCallback):
    """Static int8 quantization at fit end, calibrated on the first training batches.

    After ``fit`` the network is replaced by its int8 version (CPU), so ``trainer.test()`` /
    ``trainer.predict()`` (with a CPU trainer) run the int8 model. Calibration feeds the network the
    inputs it really receives: each batch goes through the module's batch-transfer hooks and its
    ``training_step``, whose call into the network is captured by a forward pre-hook
    (:mod:`lightning_compress.core.inputs`), so batches of any structure work. A network compiled with
    ``torch.compile`` is quantized from the module inside its wrapper; the int8 network runs uncompiled.

    Args:
        calibration_batches: Number of training batches to calibrate on (>= 1).
        engine: One of :data:`~lightning_compress.quantization.engines.ENGINES`; ``"x86_inductor"`` is
            exported with ``torch.export`` on the first calibration batch (``[pt2e]`` extra).
        skip: Glob patterns of module names (as in the LightningModule, e.g. ``"model.head"``) kept in fp32.
        network: Attribute of the LightningModule holding the network; ``None`` detects it.

    Raises:
        ValueError: On an unknown engine or ``calibration_batches < 1``.

    Example:
        >>> ptq = PostTrainingQuantization(calibration_batches=16)
        >>> # pl.Trainer(callbacks=[ptq]).fit(model)  # model's network is int8 afterwards
    """

    effect = Effect.QUANTIZES

    def __init__(
        self,
        calibration_batches: int = 32,
        engine: str = DEFAULT_ENGINE,
        skip: str | Sequence[str] | None = None,
        network: str | None = None,
    ) -> None:
        super().__init__(network)
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches must be an int >= 1, got {calibration_batches!r}")
        self.calibration_batches = calibration_batches
        self.engine = check_engine(engine, families=ALL_FAMILIES)
        self.skip = [skip] if isinstance(skip, str) else list(skip or [])

    @override
    def declaration(self, budget: StepBudget) -> Declaration:
        """Quantizes at the end of fit."""
        return self.declare(StepWindow(budget.total_steps))

    @override
    def setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check, before training, that the network can be quantized."""
        _, net = find_network(pl_module, self.network_name)
        skip_names = resolve_skip(net, self.skip, self.network_name + ".")
        family_of(self.engine).check_quantizable(net, skip_names, self.network_name + ".")

    def _calibration_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module
                            ) -> Iterator[tuple]:
        for index, batch in enumerate(itertools.islice(trainer.train_dataloader, self.calibration_batches)):
            batch = pl_module._apply_batch_transfer_handler(batch)
            yield tuple(t.cpu() if isinstance(t, torch.Tensor) else t
                        for t in capture_network_input(pl_module, network, batch, index))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate on the first ``calibration_batches`` training batches, convert, check, put in place.

        If the int8 model fails its check on the first calibration batch, a warning names the module and
        the ``skip`` pattern, and the fp32 network stays in place.
        """
        attribute = self.network_name
        called = getattr(pl_module, attribute)  # what training_step calls: where inputs are captured
        _, net = find_network(pl_module, attribute)
        batches = self._calibration_inputs(trainer, pl_module, called)
        skip_names = resolve_skip(net, self.skip, attribute + ".")
        try:
            int8 = _calibrate_and_convert(net, batches, self.engine, skip_names, attribute + ".")
        except (ConversionError, RuntimeError) as err:
            rank_zero_warn(f"PostTrainingQuantization: int8 conversion ({self.engine}) failed, {attribute!r} stays "
                           f"fp32: {err}")
            return
        setattr(pl_module, attribute, int8)
        rank_zero_info(
            f"PostTrainingQuantization: {attribute!r} calibrated on up to {self.calibration_batches} batches, "
            f"converted to int8 ({self.engine}) and checked"
        )
        if is_compiled(called):
            rank_zero_info(f"PostTrainingQuantization: {attribute!r} {UNCOMPILED_NOTE}")
