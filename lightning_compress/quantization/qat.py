"""QuantizationAwareTraining: train with fake-quantization, end ``fit`` with a real int8 model.

The callback only orchestrates *when*: it prepares the network at ``start``, freezes observers and
batch-norm statistics at their positions, logs quantization health under ``quant/``, and converts
at fit end. *How* lives in the engine's kernel family (:mod:`~lightning_compress.quantization.families`:
torch.ao FX, or torchao's PT2E) and :mod:`~lightning_compress.quantization.check`.

Resuming and reloading: preparation appends a ``quantization_aware_training`` architecture record
(:mod:`lightning_compress.core.architecture`); every loader replays it -- prepares a fresh network the
same way -- before the checkpoint's weights, observer ranges and scales load, with or without this
callback in the Trainer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.core.architecture import (
    ArchitectureRecord,
    append_record,
    applied_records,
    register_replay,
)
from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.composition import Declaration, Effect
from lightning_compress.core.inputs import capture_network_input
from lightning_compress.core.layers import find_network, is_compiled
from lightning_compress.core.progress import (
    Position,
    StepBudget,
    StepWindow,
    check_ordered,
    validate_position,
)
from lightning_compress.quantization.check import ConversionError
from lightning_compress.quantization.engines import DEFAULT_ENGINE, KernelFamily, check_engine
from lightning_compress.quantization.families import ALL_FAMILIES, family_of, input_specs, zero_inputs
from lightning_compress.quantization.prepare import UNCOMPILED_NOTE, resolve_skip

RECORD_KIND = "quantization_aware_training"
"""Architecture-record kind of QAT preparation (see :mod:`lightning_compress.core.architecture`)."""


class Stage(enum.Enum):
    """What QAT has done to the network so far (saved in the callback state by value)."""

    FP32 = "fp32"
    QAT = "qat"
    INT8 = "int8"


@register_replay(RECORD_KIND, version=1)
def replay_preparation(network: nn.Module, payload: Mapping[str, Any]) -> nn.Module:
    """Prepare a fresh fp32 network for QAT as a recorded run did (the replay of a QAT record).

    Args:
        network: The fp32 network.
        payload: ``{"engine": ..., "skip": [...]}`` as :class:`QuantizationAwareTraining` records it; a PT2E
            engine's record adds ``"example_inputs": [{"shape": [...], "dtype": "float32"}, ...]``, the inputs
            ``torch.export`` traced (zeros of those shapes are exported again).

    Returns:
        The fake-quantized network (train mode, as preparation leaves it).
    """
    return family_of(payload["engine"]).prepare_qat(network, payload["skip"], payload.get("example_inputs", ()))


def recorded_inputs(records: Sequence[ArchitectureRecord], network: str) -> tuple[torch.Tensor, ...] | None:
    """Zeros of the input shapes the QAT record of ``network`` holds (exporting engines record them at ``start``).

    Args:
        records: Architecture records, oldest first.
        network: The network's attribute name.

    Returns:
        The inputs, or None if no record of ``network`` holds shapes.
    """
    specs = [r.payload.get("example_inputs") for r in records if r.kind == RECORD_KIND and r.network == network]
    return zero_inputs(specs[-1]) if specs and specs[-1] else None


class QuantizationAwareTraining(CompressionCallback):
    """Quantization-aware training that ends in a real int8 model, for any LightningModule.

    From ``start`` on, the network trains with fake-quantized weights (int8, symmetric, per-channel)
    and activations (8-bit, per-tensor affine), Conv-BN(-ReLU) fused. At fit end it is converted to
    an int8 model for ``engine`` and put in place, so ``trainer.test()`` / ``trainer.predict()`` run
    the int8 model. torch's int8 kernels exist on CPU only: with those engines the converted network lives
    on CPU, and testing it with a GPU trainer raises (use ``Trainer(accelerator="cpu")``). A network compiled with
    ``torch.compile`` is prepared inside its wrapper; from ``start`` on it runs uncompiled (an info line says so).

    The optimizer needs no rebuild: preparation keeps the network's ``Parameter`` objects (checked
    when preparing), so training and ``MagnitudePruning`` masks act on the same tensors.
    Pruned zeros stay exactly zero through fake-quant and int8 (symmetric weights: zero-point 0).

    Args:
        start: When to start QAT (a fraction of the run, ``"<n>ep"`` or ``"<n>steps"``); default: at once.
        freeze_observers: When to stop updating quantization ranges; ``None`` keeps them updating.
        freeze_bn: When to freeze batch-norm statistics of fused Conv-BN layers; ``None`` never.
        engine: int8 engine: ``"onnxruntime"`` / ``"onnxruntime_7bit"`` / ``"onnxruntime_symmetric"`` (the int8
            QDQ ONNX model, run by onnxruntime: ``trainer.test()`` measures the file a deployment ships; 7-bit
            weights run exactly at full speed on x86 CPUs without VNNI; symmetric activations make it
            TensorRT-compatible), torch's ``"x86"``, ``"onednn"``, ``"qnnpack"``, or ``"x86_inductor"``
            (torch.export + torchao PT2E, ``[pt2e]`` extra: the network is exported on its first QAT batch, and
            the int8 model is a quantize/dequantize graph that Inductor compiles); see
            :data:`~lightning_compress.quantization.engines.ENGINES` and ``docs/quantization-design.md``.
        skip: Glob patterns of module names (as in the LightningModule, e.g. ``"model.head.*"``) kept
            in fp32 and not traced: the way out for modules that cannot be quantized or traced.
        network: Attribute of the LightningModule holding the network; ``None`` detects it.
        convert_on_fit_end: Convert to int8 and put the int8 network in place at fit end.
        log_every_n_steps: Optimizer steps between ``quant/weight_error/<layer>`` and
            ``quant/act_scale/<value>`` logs.

    Raises:
        ValueError: On an unknown engine, malformed positions, or a ``freeze_*`` position before ``start``.

    Example:
        >>> qat = QuantizationAwareTraining(start=0.1, freeze_bn=0.8, freeze_observers=0.9)
        >>> qat.engine  # the default: the int8 model is the QDQ ONNX file, run by onnxruntime
        Engine('onnxruntime')
        >>> # trainer = pl.Trainer(callbacks=[qat]); trainer.fit(model); trainer.test(model)  # int8
    """

    effect = Effect.QUANTIZES
    guards_loss = True

    def __init__(
        self,
        start: Position = 0.0,
        freeze_observers: Position | None = None,
        freeze_bn: Position | None = None,
        engine: str = DEFAULT_ENGINE,
        skip: str | Sequence[str] | None = None,
        network: str | None = None,
        convert_on_fit_end: bool = True,
        log_every_n_steps: int = 50,
    ) -> None:
        super().__init__(network)
        self.start = validate_position(start, "start")
        self.freeze_observers = freeze_observers
        self.freeze_bn = freeze_bn
        for name, position in (("freeze_observers", freeze_observers), ("freeze_bn", freeze_bn)):
            if position is not None:
                validate_position(position, name)
                check_ordered(start, position, "start", name)
        self.engine = check_engine(engine, families=ALL_FAMILIES)
        self._family = family_of(self.engine)
        self.skip = [skip] if isinstance(skip, str) else list(skip or [])
        self.convert_on_fit_end = convert_on_fit_end
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be an int >= 1, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        # state that survives a restart: what has been done to the network
        self._stage = Stage.FP32
        self._observers_frozen = False
        self._bn_frozen = False
        # resolved in setup
        self._skip_names: list[str] = []
        self._paused_observers: list[nn.Module] = []
        self._steps: dict[str, int | None] = {}
        self._last_logged_step = -1
        self._fit_completed = False

    # ----------------------------------------------------------------------------------------- setup
    @override
    def declaration(self, budget: StepBudget) -> Declaration:
        """Quantizes from ``start`` to the end of fit."""
        return self.declare(StepWindow(budget.resolve(self.start, "start")))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the network can be traced (in every stage: a test may convert it) and resolve the positions."""
        if stage == "fit" and self._stage is Stage.INT8:
            raise ValueError("the network was already converted to int8 by this callback; it cannot be trained")
        super().setup(trainer, pl_module, stage)
        # once found, keep the name: an int8 network has no float Conv/Linear for detection to see
        self.network_name, net = find_network(pl_module, self.network_name or self.network)
        if not self._family.is_prepared(net) and self._stage is not Stage.INT8:
            prefix = self.network_name + "."
            self._skip_names = resolve_skip(net, self.skip, prefix)
            self._family.check_quantizable(net, self._skip_names, prefix)
        if stage == "fit":
            self._steps = {"start": self.window.start, **{
                name: None if position is None else self.budget.resolve(position, name)
                for name, position in (("freeze_observers", self.freeze_observers), ("freeze_bn", self.freeze_bn))
            }}
            for name in ("freeze_observers", "freeze_bn"):
                if self._steps[name] is not None and self._steps[name] <= self._steps["start"]:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} (step {self._steps[name]}) must come after "
                        f"start={self.start!r} (step {self._steps['start']})"
                    )

    def _prepare(self, pl_module: pl.LightningModule, batch: Any) -> None:
        net = getattr(pl_module, self.network_name)
        was_training = net.training
        payload: dict[str, Any] = {"engine": self.engine.name, "skip": list(self._skip_names)}
        if self._family.needs_example_inputs:  # the shapes torch.export traces, recorded for the replay
            payload["example_inputs"] = input_specs(capture_network_input(pl_module, net, batch))
        prepared = replay_preparation(net, payload)
        prepared.train(was_training)
        setattr(pl_module, self.network_name, prepared)
        append_record(pl_module, ArchitectureRecord(RECORD_KIND, self.network_name, payload))
        self._stage = Stage.QAT
        if is_compiled(net):
            rank_zero_info(f"QuantizationAwareTraining: {self.network_name!r} {UNCOMPILED_NOTE}")

    # -------------------------------------------------------------------------------------- training
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume, re-apply what the model's state dict cannot carry (frozen BN flags)."""
        super().on_train_start(trainer, pl_module)
        net = getattr(pl_module, self.network_name)
        if self._stage is Stage.QAT and not self._family.is_prepared(net):
            raise RuntimeError(
                f"the checkpoint's callback state says QAT had started, but {self.network_name!r} holds no "
                "fake-quantization: the checkpoint's model weights are not from a QAT run"
            )
        if self._stage is Stage.QAT and self._bn_frozen:
            self._family.freeze_bn(net)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Prepare at ``start``; freeze observers and BN at their steps."""
        step = trainer.global_step
        if self._stage is Stage.FP32 and step >= self._steps["start"]:
            self._prepare(pl_module, batch)
            rank_zero_info(f"QuantizationAwareTraining: fake-quantization ({self.engine}) from step {step}")
        if self._stage is not Stage.QAT:
            return
        net = getattr(pl_module, self.network_name)
        if not self._observers_frozen and self._reached("freeze_observers", step):
            self._family.freeze_observers(net)
            self._observers_frozen = True
        if not self._bn_frozen and self._reached("freeze_bn", step):
            self._family.freeze_bn(net)
            self._bn_frozen = True

    def _reached(self, name: str, step: int) -> bool:
        return self._steps.get(name) is not None and step >= self._steps[name]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop on a non-finite loss; log per-layer weight quantization error and activation scales every
        ``log_every_n_steps``."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self._stage is not Stage.QAT or step % self.log_every_n_steps or step == self._last_logged_step:
            return
        self._last_logged_step = step
        errors, scales = self._family.health(getattr(pl_module, self.network_name))
        for name, error in errors.items():
            pl_module.log(f"quant/weight_error/{self.network_name}.{name}", error, on_step=True, on_epoch=False)
        for name, scale in scales.items():
            pl_module.log(f"quant/act_scale/{self.network_name}.{name}", scale, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------------ conversion
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Mark the fit as completed; conversion waits for ``teardown``."""
        self._fit_completed = True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After a completed fit, convert to int8 and put it in place (``convert_on_fit_end``).

        Converting here rather than in ``on_fit_end`` runs it after every callback's ``on_fit_end``
        whatever the callback order, so callbacks that finish their work at fit end (``MagnitudePruning``
        leaves plain zeros in the weights) still see the trained network, as the composition contract says.
        """
        super().teardown(trainer, pl_module, stage)
        if stage != "fit" or not self._fit_completed or not self.convert_on_fit_end:
            return
        self._fit_completed = False
        if self._stage is not Stage.QAT:
            rank_zero_warn(
                f"QuantizationAwareTraining never started (start at step {self._steps.get('start')}, run ended at "
                f"step {trainer.global_step}); the network stays fp32"
            )
            return
        self.convert(pl_module, self._calibration_inputs(trainer, pl_module))

    def _calibration_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple | None:
        """The network's input on the first training batch (CPU), or None without a train loader."""
        loader = trainer.train_dataloader
        if loader is None:
            return None
        batch = pl_module._apply_batch_transfer_handler(next(iter(loader)))
        net = getattr(pl_module, self.network_name)
        return tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in capture_network_input(pl_module, net, batch))

    def convert(self, pl_module: pl.LightningModule, example_inputs: tuple | None = None) -> nn.Module:
        """Convert the fake-quantized network to int8 (CPU), check it, and put it in place on ``pl_module``.

        The int8 model is the engine's shipped form (``xnnpack``: the ExecuTorch program run by ExecuTorch's
        runtime; the ONNX engines: the QDQ file in onnxruntime), so ``trainer.test()`` measures what ships.
        Right after conversion the int8 model runs ``example_inputs`` (a calibration batch) and is compared
        with the fake-quant model (:func:`~lightning_compress.quantization.check.check_conversion`). If it
        fails, a warning names the module and the ``skip`` pattern that avoids it, and the fake-quant
        network stays in place: nothing is lost.

        Args:
            pl_module: The LightningModule trained with this callback.
            example_inputs: One batch of the network's positional inputs, for the check (and the ONNX
                engines' export). Without it an engine that exports takes zeros of the shapes recorded at
                ``start`` (the check then runs on them); the torch engines skip the check.

        Returns:
            The network now in place: the int8 model, or the fake-quant one if conversion failed.

        Raises:
            ValueError: If the network was never prepared for QAT.

        Example:
            >>> # qat = QuantizationAwareTraining(convert_on_fit_end=False); trainer.fit(model)
            >>> # int8_net = qat.convert(model, (images,))
        """
        attribute, net = find_network(pl_module, self.network_name or self.network)
        device = next(net.parameters(), torch.empty(0)).device
        if example_inputs is None and self._family.needs_example_inputs:
            example_inputs = recorded_inputs(applied_records(pl_module), attribute)
        try:  # a network never prepared raises ValueError
            int8 = self._family.convert_qat(net, example_inputs, attribute + ".")
            int8 = self._family.ship(int8, example_inputs, attribute + ".")
        except (ConversionError, RuntimeError) as err:
            rank_zero_warn(f"QuantizationAwareTraining: int8 conversion ({self.engine}) failed, {attribute!r} stays "
                           f"fake-quantized: {err}")
            return net
        setattr(pl_module, attribute, int8)
        self._stage = Stage.INT8
        if device.type != "cpu" and self.engine.family is KernelFamily.TORCH_INT8:
            rank_zero_warn(
                f"int8 kernels run on CPU only: the converted network {attribute!r} was moved from {device} to "
                "CPU; evaluate it with Trainer(accelerator='cpu')"
            )
        rank_zero_info(f"QuantizationAwareTraining: {attribute!r} converted to int8 ({self.engine}) and checked")
        return int8

    def _check_cpu(self, pl_module: pl.LightningModule) -> None:
        if (self._stage is Stage.INT8 and self.engine.family is KernelFamily.TORCH_INT8
                and pl_module.device.type != "cpu"):
            raise RuntimeError(
                f"the network is int8 (converted by QuantizationAwareTraining) and int8 kernels run on CPU only, "
                f"but this trainer runs on {pl_module.device}; use Trainer(accelerator='cpu') to test or predict"
            )

    def _pause_observers(self, pl_module: pl.LightningModule) -> None:
        """Evaluation data must not move the ranges the network trains and ships with (torch.ao's
        fake-quantizers observe in eval mode too; PT2E's do not, but a network evaluated in train mode would)."""
        if self._stage is Stage.QAT:
            self._paused_observers = self._family.pause_observers(getattr(pl_module, self.network_name))

    def _resume_observers(self) -> None:
        self._family.resume_observers(self._paused_observers)
        self._paused_observers = []

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to run the int8 network on a GPU; keep the quantization ranges still while validating."""
        self._check_cpu(pl_module)
        self._pause_observers(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Let the observers that were on observe training batches again."""
        self._resume_observers()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to run the int8 network on a GPU; keep the quantization ranges still while testing."""
        self._check_cpu(pl_module)
        self._pause_observers(pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Turn the paused observers back on."""
        self._resume_observers()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to run the int8 network on a GPU; keep the quantization ranges still while predicting."""
        self._check_cpu(pl_module)
        self._pause_observers(pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Turn the paused observers back on."""
        self._resume_observers()

    # ------------------------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        """The QAT stage and what has been frozen."""
        return {"stage": self._stage.value, "observers_frozen": self._observers_frozen, "bn_frozen": self._bn_frozen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the QAT stage (the network itself was prepared before its weights loaded)."""
        self._stage = Stage(state_dict["stage"])
        self._observers_frozen = state_dict["observers_frozen"]
        self._bn_frozen = state_dict["bn_frozen"]
