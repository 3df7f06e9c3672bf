"""What the quantization callbacks call for each action, whichever kernel family prepares their engine.

The callbacks decide *when* (prepare at ``start``, freeze, pause for evaluation, convert at fit end); a
:class:`Family` does it for its engine: :class:`FxFamily` through torch.ao FX (:mod:`.prepare`, :mod:`.convert`),
:class:`Pt2eFamily` through torch.export and torchao (:mod:`.pt2e`, imported only when a PT2E engine is used:
torchao's import costs seconds). Both keep the network's ``Parameter`` objects, so optimizers and pruning masks
carry over a QAT preparation.

Example:
    >>> family = family_of("x86")
    >>> type(family).__name__, family.needs_example_inputs
    ('FxFamily', False)
"""

from __future__ import annotations

import abc
import copy
import itertools
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.core.aoti import AotiNetwork, aoti_package, has_compiler
from lightning_compress.core.executorch import ExecuTorchNetwork, pte_bytes
from lightning_compress.core.layers import unwrap_compiled
from lightning_compress.quantization import tracing
from lightning_compress.quantization.check import check_conversion
from lightning_compress.quantization.convert import convert
from lightning_compress.quantization.engines import Engine, KernelFamily, check_engine
from lightning_compress.quantization.observers import pause_observers, resume_observers
from lightning_compress.quantization.prepare import (
    activation_scales,
    calibrate,
    freeze_bn,
    freeze_observers,
    frozen_copy,
    is_prepared,
    prepare,
    weight_quantization_errors,
)
from lightning_compress.quantization.qdq import qdq_network

ALL_FAMILIES: tuple[KernelFamily, ...] = tuple(KernelFamily)
"""Every kernel family: what the callbacks accept (each dispatched to its :class:`Family`)."""


def family_of(engine: str | Engine) -> Family:
    """The :class:`Family` that prepares and converts for ``engine`` (validated by ``check_engine``)."""
    engine = check_engine(engine, families=ALL_FAMILIES)
    return Pt2eFamily(engine) if engine.family is KernelFamily.PT2E else FxFamily(engine)


def _pt2e():
    from lightning_compress.quantization import pt2e  # torchao's import costs seconds: PT2E engines only

    return pt2e


def input_specs(inputs: Sequence[Any]) -> list[dict[str, Any]]:
    """Shape (batch at least 2) and dtype of each positional input, as an architecture record stores them.

    Raises:
        ValueError: If an input is not a tensor with a batch dimension.

    Example:
        >>> input_specs((torch.zeros(1, 3, 8, 8),))
        [{'shape': [2, 3, 8, 8], 'dtype': 'float32'}]
    """
    bad = [type(x).__name__ for x in inputs if not isinstance(x, torch.Tensor) or x.dim() == 0]
    if not inputs or bad:
        raise ValueError(f"a PT2E engine exports the network with batched tensor inputs only, but it is called with "
                         f"{[type(x).__name__ for x in inputs]}; use an FX engine")
    return [{"shape": [max(2, x.shape[0]), *x.shape[1:]], "dtype": str(x.dtype).removeprefix("torch.")}
            for x in inputs]


def zero_inputs(specs: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Zero tensors of the recorded shapes and dtypes: what a PT2E network is exported with (values do not matter
    to ``torch.export``; the same inputs in the fit and in every replay give the same graph).

    Example:
        >>> zero_inputs([{"shape": [2, 3], "dtype": "float32"}])[0].shape
        torch.Size([2, 3])
    """
    return tuple(torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device) for spec in specs)


def _device(network: nn.Module) -> torch.device:
    return next(network.parameters(), torch.empty(0)).device


class Family(abc.ABC):
    """The actions of one kernel family for one engine: one method per thing a callback does."""

    needs_example_inputs = False
    """Preparation or conversion traces with real inputs (``torch.export``), so QAT records their shapes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        if engine.family is KernelFamily.QDQ_ONNX:  # conversion exports the network to ONNX
            self.needs_example_inputs = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.engine!r})"

    @abc.abstractmethod
    def check_quantizable(self, network: nn.Module, skip: Sequence[str], prefix: str) -> None:
        """Refuse in ``setup`` what preparation would refuse later, naming the module at fault."""

    @abc.abstractmethod
    def prepare_qat(self, network: nn.Module, skip: Sequence[str], specs: Sequence[Mapping[str, Any]] = ()
                    ) -> nn.Module:
        """Insert fake-quantization (parameters shared with ``network``); ``specs``: :func:`input_specs`."""

    @abc.abstractmethod
    def is_prepared(self, network: nn.Module) -> bool:
        """Whether ``network`` carries this family's observers or fake-quantization."""

    @abc.abstractmethod
    def freeze_observers(self, network: nn.Module) -> None:
        """Stop the quantization ranges (saved in the state dict)."""

    @abc.abstractmethod
    def freeze_bn(self, network: nn.Module) -> None:
        """Run the Conv-BN batch norms on their running statistics from now on."""

    def pause_observers(self, network: nn.Module) -> list[nn.Module]:
        """Stop the observers that are on; returns them for :meth:`resume_observers`."""
        return pause_observers(network)

    def resume_observers(self, paused: list[nn.Module]) -> None:
        """Turn back on what :meth:`pause_observers` stopped."""
        resume_observers(paused)

    @abc.abstractmethod
    def health(self, network: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        """``(relative weight quantization error by layer, activation scale by graph value)``."""

    @abc.abstractmethod
    def frozen_copy(self, network: nn.Module) -> nn.Module:
        """A CPU eval copy of a QAT network whose quantization parameters no longer move: what converts to int8."""

    @abc.abstractmethod
    def convert_qat(self, network: nn.Module, example_inputs: tuple | None, prefix: str) -> nn.Module:
        """The int8 model of a QAT network, checked on ``example_inputs`` against its frozen fake-quant copy
        (raises ``ValueError`` if never prepared, :class:`~.check.ConversionError` if the check fails)."""

    @abc.abstractmethod
    def calibrate_and_convert(self, network: nn.Module, batches: Iterable[tuple], skip: Sequence[str],
                              prefix: str = "", check: bool = True) -> nn.Module:
        """Static PTQ of a copy of ``network`` on ``batches``; the shipped int8 model (:meth:`ship`) checked on
        the first batch (unless not ``check``: a program built only to be timed)."""

    def ship(self, int8: nn.Module, example_inputs: tuple | None, prefix: str, check: bool = True) -> nn.Module:
        """The int8 model as the engine's runtime runs it, so that ``trainer.test()`` measures the shipped file.

        FX's int8 models already are (torch's kernels, or the QDQ ONNX file in onnxruntime).

        Args:
            int8: What :meth:`convert_qat` returned.
            example_inputs: One batch of positional inputs (CPU), to build and check the program with.
            prefix: How the caller names the network (``"model."``), for messages.
            check: Compare the program with ``int8`` on ``example_inputs``.

        Returns:
            The model to put in place.
        """
        return int8


class FxFamily(Family):
    """torch.ao FX: torch's int8 engines and the QDQ ONNX ones."""

    @override
    def check_quantizable(self, network: nn.Module, skip: Sequence[str], prefix: str) -> None:
        """Refuse before training what FX cannot trace, naming the module and the ``skip`` pattern."""
        tracing.check_quantizable(network, skip, prefix)

    @override
    def prepare_qat(self, network: nn.Module, skip: Sequence[str], specs: Sequence[Mapping[str, Any]] = ()
                    ) -> nn.Module:
        return prepare(network, self.engine, mode="qat", skip=skip)

    @override
    def is_prepared(self, network: nn.Module) -> bool:
        return is_prepared(network)

    @override
    def freeze_observers(self, network: nn.Module) -> None:
        freeze_observers(network)

    @override
    def freeze_bn(self, network: nn.Module) -> None:
        freeze_bn(network)

    @override
    def health(self, network: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        return weight_quantization_errors(network), activation_scales(network)

    @override
    def frozen_copy(self, network: nn.Module) -> nn.Module:
        return frozen_copy(network)

    @override
    def convert_qat(self, network: nn.Module, example_inputs: tuple | None, prefix: str) -> nn.Module:
        if not is_prepared(network):
            convert(network, self.engine, example_inputs)  # raises its "never prepared" error
        reference = frozen_copy(network)
        int8 = convert(copy.deepcopy(reference), self.engine, example_inputs)
        if example_inputs is not None:
            check_conversion(reference, int8, example_inputs, prefix)
        return int8

    @override
    def calibrate_and_convert(self, network: nn.Module, batches: Iterable[tuple], skip: Sequence[str],
                              prefix: str = "", check: bool = True) -> nn.Module:

        prepared = prepare(copy.deepcopy(network).cpu(), self.engine, mode="static", skip=skip)
        first, batches = _first(batches)
        calibrate(prepared, batches)
        reference = qdq_network(prepared, saturate_at_trained_range=True) if check else None
        int8 = convert(prepared, self.engine, first)
        if reference is not None:
            check_conversion(reference, int8, first, prefix)
        return int8


class Pt2eFamily(Family):
    """torch.export and torchao's quantizer for the engine (``[pt2e]`` extra)."""

    needs_example_inputs = True

    @override
    def check_quantizable(self, network: nn.Module, skip: Sequence[str], prefix: str) -> None:
        """Nothing before the first batch: ``torch.export`` needs real input shapes, and preparation raises a
        ``ValueError`` naming the export error."""

    @override
    def prepare_qat(self, network: nn.Module, skip: Sequence[str], specs: Sequence[Mapping[str, Any]] = ()
                    ) -> nn.Module:
        network = unwrap_compiled(network)
        return _pt2e().prepare(network, self.engine, "qat", skip, example_inputs=zero_inputs(specs, _device(network)))

    @override
    def is_prepared(self, network: nn.Module) -> bool:
        return _pt2e().is_pt2e_prepared(network)

    @override
    def freeze_observers(self, network: nn.Module) -> None:
        _pt2e().freeze_observers(network)

    @override
    def freeze_bn(self, network: nn.Module) -> None:
        _pt2e().freeze_bn(network)

    @override
    def health(self, network: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        pt2e = _pt2e()
        return pt2e.weight_quantization_errors(network), pt2e.activation_scales(network)

    @override
    def frozen_copy(self, network: nn.Module) -> nn.Module:
        return _pt2e().frozen_copy(network)

    @override
    def convert_qat(self, network: nn.Module, example_inputs: tuple | None, prefix: str) -> nn.Module:
        """The quantize/dequantize graph, on the network's device (its ops run wherever the network did)."""
        pt2e = _pt2e()
        device = _device(network)
        int8 = pt2e.convert(network, self.engine.int32_bias)  # raises its "never prepared" error
        if example_inputs is not None:
            check_conversion(pt2e.frozen_copy(network), int8, example_inputs, prefix)
        return int8.to(device)

    @override
    def calibrate_and_convert(self, network: nn.Module, batches: Iterable[tuple], skip: Sequence[str],
                              prefix: str = "", check: bool = True) -> nn.Module:
        """Static PTQ; the check compares the int8 graph with the fp32 network (a calibrated PT2E graph has no
        fake-quant form other than its conversion)."""
        pt2e = _pt2e()
        first, batches = _first(batches)
        network = copy.deepcopy(unwrap_compiled(network)).cpu()
        prepared = pt2e.prepare(network, self.engine, "static", skip, example_inputs=zero_inputs(input_specs(first)))
        pt2e.calibrate(prepared, batches)
        int8 = pt2e.convert(prepared, self.engine.int32_bias)
        if check:
            check_conversion(pt2e.frozen_copy(prepared), int8, first, prefix)
        return self.ship(int8, first, prefix, check)

    @override
    def ship(self, int8: nn.Module, example_inputs: tuple | None, prefix: str, check: bool = True) -> nn.Module:
        """The engine's program built from the quantize/dequantize graph and checked against it on
        ``example_inputs``: ``xnnpack``, the ExecuTorch program (``.pte``, XNNPACK kernels); ``x86_inductor``, the
        AOTInductor package (``.pt2``, oneDNN int8 kernels; without a C++ compiler to build it, the graph itself,
        with a warning)."""
        if example_inputs is None or len(example_inputs) != 1:
            raise ValueError(f"engine {self.engine.name!r} ships a compiled program: pass one batch of the network's "
                             "single input")
        images = example_inputs[0].cpu()
        graph = copy.deepcopy(int8).cpu()
        if self.engine.runtime == "executorch":
            program: nn.Module = ExecuTorchNetwork(pte_bytes(graph, images), quantized=True)
        elif not has_compiler():
            rank_zero_warn(f"engine {self.engine.name!r}: no C++ compiler to build the AOTInductor package, so the "
                           "int8 network stays the quantize/dequantize graph run by eager torch, not the shipped .pt2")
            return int8
        else:
            example = images if len(images) > 1 else torch.cat([images, images])  # batch 1 would be specialized
            with tempfile.TemporaryDirectory() as folder:
                aoti_package(graph, example, Path(folder) / "model.pt2")
                program = AotiNetwork(Path(folder) / "model.pt2", quantized=True)
        if check:
            check_conversion(int8.cpu(), program, (images,), prefix)
        return program


def _first(batches: Iterable[tuple]) -> tuple[tuple, Iterable[tuple]]:
    """The first batch, and every batch (the first included)."""
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("static quantization needs at least one calibration batch, got none")
    return first, itertools.chain([first], iterator)
