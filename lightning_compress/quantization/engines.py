"""The int8 engines: one row each, parsed once from the name the user gives.

An :class:`Engine` says which kernels run its int8 model, which runtime that model ships to, and the
activation range it trains with; every other module reads those attributes, never the name. Adding an
engine is one row of :data:`ENGINE_TABLE` (plus, for a new kernel family, the module that converts to it).
Why these engines and their numerics: ``docs/quantization-design.md``.

Example:
    >>> engine = check_engine("x86")
    >>> engine, engine.family is KernelFamily.TORCH_INT8, engine.reduced_range
    (Engine('x86'), True, True)
"""

from __future__ import annotations

import enum
import importlib.util
from collections.abc import Collection
from dataclasses import dataclass

import torch

from lightning_compress.core.executorch import EXECUTORCH_EXTRA
from lightning_compress.core.onnx import MissingExtraError, require_onnx


class KernelFamily(enum.Enum):
    """How an engine's int8 model computes."""

    TORCH_INT8 = "torch-int8"
    """torch's quantized tensors and kernels (deprecated by torch), shipped as TorchScript."""
    QDQ_ONNX = "qdq-onnx"
    """The QDQ ONNX model built from the learned quantization parameters, run by onnxruntime."""
    PT2E = "pt2e"
    """A ``torch.export`` graph of quantize/dequantize ops from torchao's PT2E flow, lowered to int8 kernels by a
    compiler (Inductor, ExecuTorch); :mod:`~lightning_compress.quantization.pt2e`."""


INT8_WEIGHT_MAX = 127
"""Largest weight code of the 8-bit engines (weights on -127..127)."""


@dataclass(frozen=True, repr=False)
class Engine:
    """One int8 engine.

    Attributes:
        name: What users write (``engine="x86"``), and what checkpoints and files record.
        family: How its int8 model computes.
        kernels: The int8 kernels that run it.
        runtime: Where its int8 model ships: ``"torch"`` (a TorchScript file), ``"onnxruntime"`` or ``"aoti"``
            (an AOTInductor package).
        reduced_range: Activations train on codes 0..127, so that no u8 x s8 pair of products overflows
            the int16 sums of x86 kernels without VNNI.
        symmetric_activations: Activations are int8 with zero-point 0 (the QDQ form TensorRT reads).
        signed_activations: Activations are int8 codes -128..127 (XNNPACK's QS8) instead of uint8.
        weight_quant_max: Weights are int8 codes -weight_quant_max..weight_quant_max per channel. 63 (7 bits):
            no u8 x s8 pair of products overflows the int16 sums of x86 kernels without VNNI, and onnxruntime's
            exact mode keeps its fast kernels for such layers (it converts only weights outside -64..63).
        int32_bias: The kernels add each bias as int32 codes of input scale x weight scale (XNNPACK), so the
            converted graph rounds its biases to those codes and computes what the program does.
    """

    name: str
    family: KernelFamily
    kernels: str
    runtime: str
    reduced_range: bool = False
    symmetric_activations: bool = False
    signed_activations: bool = False
    weight_quant_max: int = INT8_WEIGHT_MAX
    int32_bias: bool = False

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Engine({self.name!r})"


ENGINE_TABLE: dict[str, Engine] = {engine.name: engine for engine in (
    Engine("x86", KernelFamily.TORCH_INT8, "fbgemm", "torch", reduced_range=True),
    Engine("onednn", KernelFamily.TORCH_INT8, "oneDNN", "torch", reduced_range=True),
    Engine("qnnpack", KernelFamily.TORCH_INT8, "QNNPACK (ARM, mobile)", "torch"),
    Engine("onnxruntime", KernelFamily.QDQ_ONNX, "onnxruntime U8S8", "onnxruntime"),
    Engine("onnxruntime_7bit", KernelFamily.QDQ_ONNX, "onnxruntime U8S8, 7-bit weights (exact at full speed on x86 "
           "without VNNI)", "onnxruntime", weight_quant_max=63),
    Engine("onnxruntime_symmetric", KernelFamily.QDQ_ONNX, "onnxruntime, TensorRT", "onnxruntime",
           symmetric_activations=True),
    Engine("x86_inductor", KernelFamily.PT2E, "oneDNN through Inductor", "aoti", reduced_range=True),
    Engine("xnnpack", KernelFamily.PT2E, "XNNPACK through ExecuTorch (ARM and x86 CPUs)", "executorch",
           signed_activations=True, int32_bias=True),
)}
"""Every int8 engine, by name."""
ENGINES: tuple[str, ...] = tuple(ENGINE_TABLE)
"""The names of every int8 engine."""
DEFAULT_ENGINE = "onnxruntime"
"""The quantization callbacks' engine when none is named: its int8 model is the QDQ ONNX file an export ships,
so ``trainer.test()`` measures that very file (``docs/quantization-design.md``)."""
TORCH_ENGINES: tuple[str, ...] = tuple(n for n, e in ENGINE_TABLE.items() if e.family is KernelFamily.TORCH_INT8)
"""Engines whose int8 model is torch's (quantized tensors): ``x86``, ``onednn``, ``qnnpack``."""
ONNX_ENGINES: tuple[str, ...] = tuple(n for n, e in ENGINE_TABLE.items() if e.family is KernelFamily.QDQ_ONNX)
"""Engines whose int8 model is the QDQ ONNX run by onnxruntime (needs the ``[export]`` extra)."""
PT2E_ENGINES: tuple[str, ...] = tuple(n for n, e in ENGINE_TABLE.items() if e.family is KernelFamily.PT2E)
"""Engines prepared by torchao's PT2E flow (needs the ``[pt2e]`` extra): ``x86_inductor``, and ``xnnpack``, whose
``XNNPACKQuantizer`` ships with ExecuTorch (the ``[executorch]`` extra)."""
FX_FAMILIES: tuple[KernelFamily, ...] = (KernelFamily.TORCH_INT8, KernelFamily.QDQ_ONNX)
"""The families torch.ao FX prepares (:mod:`~lightning_compress.quantization.prepare`)."""
PT2E_EXTRA = "pip install 'lightning-compress[pt2e]'"
"""How to install torchao for the PT2E engines."""

REDUCED_QUANT_MAX = 127
"""Largest activation code of the reduced-range engines: no u8 x s8 pair of products overflows int16."""


def reduced_range_max(scale: float, zero_point: int) -> float:
    """The largest value an activation quantized on the reduced range represents.

    Args:
        scale: The activation's scale.
        zero_point: Its zero-point.

    Returns:
        ``(127 - zero_point) * scale``.

    Example:
        >>> reduced_range_max(0.5, 7)
        60.0
    """
    return (REDUCED_QUANT_MAX - zero_point) * scale


def check_engine(engine: str | Engine, families: Collection[KernelFamily] = FX_FAMILIES) -> Engine:
    """Parse an engine name (validated against :data:`ENGINES`, the caller's families and this installation).

    Args:
        engine: One of :data:`ENGINES`, or an :class:`Engine` (checked again).
        families: The kernel families the caller prepares; PT2E engines are refused unless named here.

    Returns:
        The engine.

    Raises:
        ValueError: If the engine is unknown, of another family, or this torch build lacks it.
        MissingExtraError: For an ONNX engine without the ``[export]`` extra, a PT2E one without ``[pt2e]``.

    Example:
        >>> check_engine("onnxruntime").runtime
        'onnxruntime'
    """
    name = engine.name if isinstance(engine, Engine) else engine
    taken = [n for n, e in ENGINE_TABLE.items() if e.family in families]
    if not isinstance(name, str) or name not in ENGINE_TABLE:
        raise ValueError(f"engine must be one of {taken}, got {engine!r}")
    parsed = ENGINE_TABLE[name]
    if parsed.family not in families:
        raise ValueError(f"engine {name!r} is a {parsed.family.value} engine, which this does not prepare; "
                         f"it takes {taken}")
    if parsed.family is KernelFamily.QDQ_ONNX:
        require_onnx(f"engine={name!r}")
        return parsed
    if parsed.family is KernelFamily.PT2E:
        if importlib.util.find_spec("torchao") is None:
            raise MissingExtraError(
                f"engine={name!r} needs the 'torchao' package, which is not installed: {PT2E_EXTRA}")
        if parsed.runtime == "executorch" and importlib.util.find_spec("executorch") is None:
            raise MissingExtraError(
                f"engine={name!r} needs the 'executorch' package, which is not installed: {EXECUTORCH_EXTRA}")
        return parsed
    if name not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"engine {name!r} is not available in this torch build; available: "
            f"{[e for e in TORCH_ENGINES if e in torch.backends.quantized.supported_engines]}"
        )
    return parsed
