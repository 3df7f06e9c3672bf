"""QuantizationAwareTraining: train with fake-quantization, end ``fit`` with a real int8 model.

The callback only orchestrates *when*: it prepares the network at ``start``, freezes observers and
batch-norm statistics at their positions, logs quantization health under ``quant/``, and converts
at fit end. *How* lives in :mod:`lightning_compress.quantization.backend`.

Resuming and reloading: preparation appends a ``quantization_aware_training`` architecture record
(:mod:`lightning_compress.core.architecture`); every loader replays it -- prepares a fresh network the
same way -- before the checkpoint's weights, observer ranges and scales load, with or without this
callback in the Trainer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_compress.core.architecture import (
    ArchitectureRecord,
    append_record,
    install_restore_hook,
    register_replay,
    remove_restore_hook,
    write_records,
)
from lightning_compress.core.composition import Declaration, Effect, check_composition
from lightning_compress.core.guards import check_step_loss
from lightning_compress.core.inputs import capture_network_input
from lightning_compress.core.layers import find_network
from lightning_compress.core.progress import (
    Position,
    StepWindow,
    check_ordered,
    step_budget,
    validate_position,
)
from lightning_compress.quantization import backend, tracing

RECORD_KIND = "quantization_aware_training"
"""Architecture-record kind of QAT preparation (see :mod:`lightning_compress.core.architecture`)."""


@register_replay(RECORD_KIND, version=1)
def replay_preparation(network: nn.Module, payload: Mapping[str, Any]) -> nn.Module:
    """Prepare a fresh fp32 network for QAT as a recorded run did (the replay of a QAT record).

    Args:
        network: The fp32 network.
        payload: ``{"engine": ..., "skip": [...]}`` as :class:`QuantizationAwareTraining` records it.

    Returns:
        The fake-quantized network (train mode, as preparation leaves it).
    """
    return backend.prepare(network, payload["engine"], mode="qat", skip=payload["skip"])


class QuantizationAwareTraining(Callback):
    """Quantization-aware training that ends in a real int8 model, for any LightningModule.

    From ``start`` on, the network trains with fake-quantized weights (int8, symmetric, per-channel)
    and activations (8-bit, per-tensor affine), Conv-BN(-ReLU) fused. At fit end it is converted to
    an int8 model for ``engine`` and put in place, so ``trainer.test()`` / ``trainer.predict()`` run
    the int8 model. int8 kernels exist on CPU only: the converted network lives on CPU, and testing
    it with a GPU trainer raises (use ``Trainer(accelerator="cpu")``).

    The optimizer needs no rebuild: preparation keeps the network's ``Parameter`` objects (the
    backend checks this), so training and ``MagnitudePruning`` masks act on the same tensors.
    Pruned zeros stay exactly zero through fake-quant and int8 (symmetric weights: zero-point 0).

    Args:
        start: When to start QAT (a fraction of the run, ``"<n>ep"`` or ``"<n>steps"``); default: at once.
        freeze_observers: When to stop updating quantization ranges; ``None`` keeps them updating.
        freeze_bn: When to freeze batch-norm statistics of fused Conv-BN layers; ``None`` never.
        engine: int8 engine: ``"onnxruntime"`` / ``"onnxruntime_symmetric"`` (the int8 QDQ ONNX model, run
            by onnxruntime: ``trainer.test()`` measures the file a deployment ships; symmetric activations
            make it TensorRT-compatible), or torch's ``"x86"``, ``"onednn"``, ``"qnnpack"``; see
            :data:`~lightning_compress.quantization.backend.ENGINES` and the backend's docstring.
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
        >>> qat.engine
        'x86'
        >>> # trainer = pl.Trainer(callbacks=[qat]); trainer.fit(model); trainer.test(model)  # int8
    """

    def __init__(
        self,
        start: Position = 0.0,
        freeze_observers: Position | None = None,
        freeze_bn: Position | None = None,
        engine: str = "x86",
        skip: str | Sequence[str] | None = None,
        network: str | None = None,
        convert_on_fit_end: bool = True,
        log_every_n_steps: int = 50,
    ) -> None:
        self.start = validate_position(start, "start")
        self.freeze_observers = freeze_observers
        self.freeze_bn = freeze_bn
        for name, position in (("freeze_observers", freeze_observers), ("freeze_bn", freeze_bn)):
            if position is not None:
                validate_position(position, name)
                check_ordered(start, position, "start", name)
        self.engine = backend.check_engine(engine)
        self.skip = [skip] if isinstance(skip, str) else list(skip or [])
        self.network = network
        self.convert_on_fit_end = convert_on_fit_end
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be an int >= 1, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        # state that survives a restart: what has been done to the network
        self._stage = "fp32"  # -> "qat" -> "int8"
        self._observers_frozen = False
        self._bn_frozen = False
        # resolved in setup
        self._attribute: str | None = None
        self._skip_names: list[str] = []
        self._steps: dict[str, int | None] = {}
        self._last_logged_step = -1
        self._fit_completed = False

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the network, check it can be traced, resolve positions, check the composition."""
        install_restore_hook(pl_module)
        # once found, keep the name: an int8 network has no float Conv/Linear for detection to see
        self._attribute, net = find_network(pl_module, self._attribute or self.network)
        if stage == "fit" and self._stage == "int8":
            raise ValueError("the network was already converted to int8 by this callback; it cannot be trained")
        if not backend.is_prepared(net) and self._stage != "int8":
            prefix = self._attribute + "."
            self._skip_names = backend.resolve_skip(net, self.skip, prefix)
            tracing.check_quantizable(net, self._skip_names, prefix)
        if stage == "fit":
            budget = step_budget(trainer)
            self._steps = {
                name: None if position is None else budget.resolve(position, name)
                for name, position in (
                    ("start", self.start), ("freeze_observers", self.freeze_observers), ("freeze_bn", self.freeze_bn)
                )
            }
            for name in ("freeze_observers", "freeze_bn"):
                if self._steps[name] is not None and self._steps[name] <= self._steps["start"]:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} (step {self._steps[name]}) must come after "
                        f"start={self.start!r} (step {self._steps['start']})"
                    )
            check_composition(trainer)

    def compression_declaration(self, trainer: pl.Trainer) -> Declaration:
        """Quantizes from ``start`` to the end of fit.

        Args:
            trainer: The trainer about to fit.

        Returns:
            The declaration :func:`~lightning_compress.core.composition.check_composition` reads.
        """
        return Declaration(type(self).__name__, Effect.QUANTIZES,
                           StepWindow(step_budget(trainer).resolve(self.start, "start")))

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        net = getattr(pl_module, self._attribute)
        was_training = net.training
        prepared = backend.prepare(net, self.engine, mode="qat", skip=self._skip_names)
        prepared.train(was_training)
        setattr(pl_module, self._attribute, prepared)
        append_record(pl_module, ArchitectureRecord(
            RECORD_KIND, self._attribute, {"engine": self.engine, "skip": list(self._skip_names)}))
        self._stage = "qat"

    # -------------------------------------------------------------------------------------- training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume, re-apply what the model's state dict cannot carry (frozen BN flags)."""
        net = getattr(pl_module, self._attribute)
        if self._stage == "qat" and not backend.is_prepared(net):
            raise RuntimeError(
                f"the checkpoint's callback state says QAT had started, but {self._attribute!r} holds no "
                "fake-quantization: the checkpoint's model weights are not from a QAT run"
            )
        if self._stage == "qat" and self._bn_frozen:
            backend.freeze_bn(net)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Prepare at ``start``; freeze observers and BN at their steps."""
        step = trainer.global_step
        if self._stage == "fp32" and step >= self._steps["start"]:
            self._prepare(pl_module)
            rank_zero_info(f"QuantizationAwareTraining: fake-quantization ({self.engine}) from step {step}")
        if self._stage != "qat":
            return
        net = getattr(pl_module, self._attribute)
        if not self._observers_frozen and self._reached("freeze_observers", step):
            backend.freeze_observers(net)
            self._observers_frozen = True
        if not self._bn_frozen and self._reached("freeze_bn", step):
            backend.freeze_bn(net)
            self._bn_frozen = True

    def _reached(self, name: str, step: int) -> bool:
        return self._steps.get(name) is not None and step >= self._steps[name]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop on a non-finite loss; log per-layer weight quantization error and activation scales every
        ``log_every_n_steps``."""
        step = trainer.global_step
        if self._stage == "qat":
            check_step_loss(trainer, outputs, type(self).__name__)
        if self._stage != "qat" or step % self.log_every_n_steps or step == self._last_logged_step:
            return
        self._last_logged_step = step
        net = getattr(pl_module, self._attribute)
        for name, error in backend.weight_quantization_errors(net).items():
            pl_module.log(f"quant/weight_error/{self._attribute}.{name}", error, on_step=True, on_epoch=False)
        for name, scale in backend.activation_scales(net).items():
            pl_module.log(f"quant/act_scale/{self._attribute}.{name}", scale, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------------ conversion
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Mark the fit as completed; conversion waits for ``teardown``."""
        self._fit_completed = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After a completed fit, convert to int8 and put it in place (``convert_on_fit_end``).

        Converting here rather than in ``on_fit_end`` runs it after every callback's ``on_fit_end``
        whatever the callback order, so callbacks that finish their work at fit end (``MagnitudePruning``
        leaves plain zeros in the weights) still see the trained network, as the composition contract says.
        """
        remove_restore_hook(pl_module)
        if stage != "fit" or not self._fit_completed or not self.convert_on_fit_end:
            return
        self._fit_completed = False
        if self._stage != "qat":
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
        net = getattr(pl_module, self._attribute)
        return tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in capture_network_input(pl_module, net, batch))

    def convert(self, pl_module: pl.LightningModule, example_inputs: tuple | None = None) -> nn.Module:
        """Convert the fake-quantized network to int8 (CPU), check it, and put it in place on ``pl_module``.

        Right after conversion the int8 model runs ``example_inputs`` (a calibration batch) and is compared
        with the fake-quant model (:func:`~lightning_compress.quantization.backend.check_conversion`). If it
        fails, a warning names the module and the ``skip`` pattern that avoids it, and the fake-quant
        network stays in place: nothing is lost.

        Args:
            pl_module: The LightningModule trained with this callback.
            example_inputs: One batch of the network's positional inputs; required by the ONNX engines
                (the export traces it) and by the check (without it the check is skipped).

        Returns:
            The network now in place: the int8 model, or the fake-quant one if conversion failed.

        Raises:
            ValueError: If the network was never prepared for QAT.

        Example:
            >>> # qat = QuantizationAwareTraining(convert_on_fit_end=False); trainer.fit(model)
            >>> # int8_net = qat.convert(model, (images,))
        """
        attribute, net = find_network(pl_module, self._attribute or self.network)
        if not backend.is_prepared(net):
            backend.convert(net, self.engine, example_inputs)  # raises its "never prepared" error
        device = next(net.parameters(), torch.empty(0)).device
        prefix = attribute + "."
        try:
            reference = backend.frozen_copy(net)
            int8 = backend.convert(copy.deepcopy(reference), self.engine, example_inputs)
            if example_inputs is not None:
                backend.check_conversion(reference, int8, example_inputs, prefix)
        except (backend.ConversionError, RuntimeError) as err:
            rank_zero_warn(f"QuantizationAwareTraining: int8 conversion ({self.engine}) failed, {attribute!r} stays "
                           f"fake-quantized: {err}")
            return net
        setattr(pl_module, attribute, int8)
        self._stage = "int8"
        if device.type != "cpu" and self.engine in backend.TORCH_ENGINES:
            rank_zero_warn(
                f"int8 kernels run on CPU only: the converted network {attribute!r} was moved from {device} to "
                "CPU; evaluate it with Trainer(accelerator='cpu')"
            )
        rank_zero_info(f"QuantizationAwareTraining: {attribute!r} converted to int8 ({self.engine}) and checked")
        return int8

    def _check_cpu(self, pl_module: pl.LightningModule) -> None:
        if self._stage == "int8" and self.engine in backend.TORCH_ENGINES and pl_module.device.type != "cpu":
            raise RuntimeError(
                f"the network is int8 (converted by QuantizationAwareTraining) and int8 kernels run on CPU only, "
                f"but this trainer runs on {pl_module.device}; use Trainer(accelerator='cpu') to test or predict"
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to run the int8 network on a GPU."""
        self._check_cpu(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to run the int8 network on a GPU."""
        self._check_cpu(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to run the int8 network on a GPU."""
        self._check_cpu(pl_module)

    # ------------------------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Write the architecture records (the QAT preparation) into the checkpoint."""
        write_records(pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """The QAT stage and what has been frozen."""
        return {"stage": self._stage, "observers_frozen": self._observers_frozen, "bn_frozen": self._bn_frozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the QAT stage (the network itself was prepared before its weights loaded)."""
        self._stage = state_dict["stage"]
        self._observers_frozen = state_dict["observers_frozen"]
        self._bn_frozen = state_dict["bn_frozen"]
