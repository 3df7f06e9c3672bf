"""The QDQ form of a quantized network: what its ONNX model computes, built from the learned parameters.

A network in *QDQ form* is a plain fp32 ``nn.Module`` in which every quantized activation passes
through :func:`quantize_dequantize` (per-tensor scale and zero-point; the zero-point's dtype, ``uint8`` or
``int8``, is the 8-bit type) and every quantized weight is stored as ``int8`` and read through
:func:`dequantize` (per output channel). In torch the two ops compute exactly what ONNX's
``QuantizeLinear``/``DequantizeLinear`` compute (``round(x / scale)`` half to even, saturated to the
type's range, or to ``quant_max`` on the reduced range of the x86 engines: a ``Clip`` of the 8-bit codes),
so the QDQ-form network is the fake-quant model onnxruntime runs. :func:`qdq_network` builds it from a
QAT-trained or PTQ-calibrated network; :func:`qdq_onnx_bytes` exports it through ``torch.export`` (no
TorchScript, no quantized tensors), and onnxruntime fuses each ``DequantizeLinear -> Conv -> QuantizeLinear``
into an int8 kernel.

Example:
    >>> x = torch.tensor([-1.0, 0.04, 0.06, 3.0])
    >>> quantize_dequantize(x, torch.tensor(0.1), torch.tensor(0, dtype=torch.uint8))
    tensor([0.0000, 0.0000, 0.1000, 3.0000])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.nn import functional as F

from lightning_compress.core.onnx import onnx_bytes, require_onnx
from lightning_compress.quantization.deprecations import quiet_torch_ao
from lightning_compress.quantization.prepare import folded_weight_and_bias, frozen_copy, weighted_layer

with quiet_torch_ao():
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.qat as nniqat
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


@torch.library.custom_op("lightning_compress::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        quant_max: Optional[int] = None) -> torch.Tensor:
    """Per-tensor ``DequantizeLinear(QuantizeLinear(x))`` with ONNX's rounding and saturation.

    Args:
        x: Any float tensor.
        scale: 0-d float32 scale.
        zero_point: 0-d ``uint8`` or ``int8`` zero-point (its dtype sets the range: 0..255 or -128..127).
        quant_max: A largest code below the type's (127 on the x86 engines' reduced range), or None.

    Returns:
        ``x`` rounded to the 8-bit grid, in float.
    """
    low, high = _RANGES[zero_point.dtype]
    zero = zero_point.float()
    return (torch.clamp(torch.round(x / scale) + zero, low, high if quant_max is None else quant_max) - zero) * scale


@quantize_dequantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_max: Optional[int] = None) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lightning_compress::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel ``DequantizeLinear``: ``(q - zero_point) * scale`` along ``axis``.

    Args:
        q: ``int8`` values.
        scale: float32 scales, one per slice along ``axis``.
        zero_point: ``int8`` zero-points, same shape as ``scale``.
        axis: The channel dimension of ``q``.

    Returns:
        The float tensor.
    """
    shape = [1] * q.dim()
    shape[axis] = -1
    return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


@dequantize.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


class QuantizeDequantize(nn.Module):
    """A quantized activation: :func:`quantize_dequantize` with fixed per-tensor parameters.

    Args:
        scale: The scale.
        zero_point: The zero-point.
        dtype: ``torch.uint8`` (affine, 0..255) or ``torch.int8`` (-128..127; symmetric when 0).
        quant_max: The largest code, if below the type's (127: the reduced range of the x86 engines).

    Example:
        >>> QuantizeDequantize(0.5, 0, torch.int8)(torch.tensor([0.2, 0.3, 100.0]))
        tensor([ 0.0000,  0.5000, 63.5000])
        >>> QuantizeDequantize(0.5, 0, torch.uint8, quant_max=127)(torch.tensor([100.0]))
        tensor([63.5000])
    """

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype, quant_max: int | None = None) -> None:
        super().__init__()
        if dtype not in _RANGES:
            raise ValueError(f"dtype must be one of {list(_RANGES)}, got {dtype}")
        low, high = _RANGES[dtype]
        if quant_max is not None and not max(low, int(zero_point)) <= quant_max <= high:
            raise ValueError(f"quant_max must be in [max({low}, zero_point={zero_point}), {high}] for {dtype}, "
                             f"got {quant_max}")
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=dtype))
        self.quant_max = None if quant_max == high else quant_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.scale, self.zero_point, self.quant_max)

    def extra_repr(self) -> str:
        return "" if self.quant_max is None else f"quant_max={self.quant_max}"

    def saturates_outside(self, low: float, high: float) -> bool:
        """Whether ``low`` and ``high`` already quantize to the ends of the range (``quant_max`` on top).

        Quantizing is monotonic, so then ``self(clamp(x, low, high)) == self(x)`` for every ``x``: a clamp
        right before this quantization changes nothing and can go.

        Args:
            low: The clamp's lower bound (``-inf``: none).
            high: The clamp's upper bound (``inf``: none).

        Returns:
            True if the clamp is redundant.

        Example:
            >>> QuantizeDequantize(6 / 255, 0, torch.uint8).saturates_outside(0.0, 6.0)
            True
            >>> QuantizeDequantize(6 / 255, 3, torch.uint8).saturates_outside(0.0, 6.0)  # keeps -3 steps
            False
        """
        quant_min, quant_max = _RANGES[self.zero_point.dtype]
        quant_max = quant_max if self.quant_max is None else self.quant_max
        bounds = torch.tensor([low, high], dtype=torch.float32)
        codes = torch.clamp(torch.round(bounds / self.scale) + self.zero_point.float(), quant_min, quant_max)
        return codes.tolist() == [quant_min, quant_max]


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                    quant_max: int, axis: int = 0) -> torch.Tensor:
    """Per-channel int8 codes of ``weight`` as torch's fake-quantization computes them.

    Args:
        weight: The float weight.
        scale: One scale per slice along ``axis``.
        zero_point: One zero-point per slice.
        quant_min: Smallest code (e.g. -127).
        quant_max: Largest code (e.g. 127).
        axis: The channel dimension.

    Returns:
        ``int8`` codes.

    Example:
        >>> quantize_weight(torch.tensor([[1.0, -0.5]]), torch.tensor([1 / 127]), torch.tensor([0]), -127, 127)
        tensor([[127, -64]], dtype=torch.int8)
    """
    shape = [1] * weight.dim()
    shape[axis] = -1
    inverse = 1.0 / scale.float().reshape(shape)  # torch's fake-quant multiplies by the inverse scale
    codes = torch.round(weight.detach().float() * inverse) + zero_point.reshape(shape)
    return codes.clamp(quant_min, quant_max).to(torch.int8)


class DequantizedWeight(nn.Module):
    """An int8 per-channel weight read as float through :func:`dequantize` (a ``DequantizeLinear`` in ONNX).

    Args:
        codes: ``int8`` codes.
        scale: float scales, one per output channel (dim 0).
        zero_point: ``int8`` zero-points (0 for symmetric weights).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().reshape(-1).to(torch.int8).clone())

    def forward(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, 0)


class QDQConv(nn.Module):
    """A convolution (1d/2d/3d) with an int8 per-channel weight and an fp32 bias, optionally followed by ReLU.

    Args:
        conv: The float convolution whose hyperparameters (stride, padding, dilation, groups) are kept.
        weight: Its int8 weight (BN already folded in).
        bias: Its fp32 bias (BN folded in), or None.
        relu: Apply ReLU after the convolution (a fused Conv-ReLU).
    """

    def __init__(self, conv: nn.modules.conv._ConvNd, weight: DequantizedWeight, bias: torch.Tensor | None,
                 relu: bool = False) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' for int8 export, got {conv.padding_mode!r}")
        self.weight = weight
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.function = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[conv.weight.dim() - 2]
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.function(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        return torch.relu(out) if self.relu else out


class QDQLinear(nn.Module):
    """A linear layer with an int8 per-channel weight and an fp32 bias, optionally followed by ReLU.

    Args:
        weight: Its int8 weight (BN folded in).
        bias: Its fp32 bias, or None.
        relu: Apply ReLU after it.
    """

    def __init__(self, weight: DequantizedWeight, bias: torch.Tensor | None, relu: bool = False) -> None:
        super().__init__()
        self.weight = weight
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight(), self.bias)
        return torch.relu(out) if self.relu else out


def onnx_translations() -> dict[Any, Callable]:
    """The ONNX meaning of the two QDQ ops: ``QuantizeLinear``/``DequantizeLinear`` (opset 18).

    A ``quant_max`` below the type's becomes a ``Clip`` of the 8-bit codes between the two, which onnxruntime
    runs on bytes and which keeps ``DequantizeLinear -> Conv -> QuantizeLinear`` fused into one int8 kernel.

    Returns:
        ``{torch op overload: onnxscript function}``, for :func:`~lightning_compress.core.onnx.onnx_bytes`.
    """
    from onnxscript import opset18 as op

    def quantize_dequantize_onnx(x, scale, zero_point, quant_max=None):
        codes = op.QuantizeLinear(x, scale, zero_point)
        if quant_max is not None:
            codes = op.Clip(codes, None, op.CastLike(op.Constant(value_int=quant_max), zero_point))
        return op.DequantizeLinear(codes, scale, zero_point)

    def dequantize_onnx(q, scale, zero_point, axis: int):
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return {torch.ops.lightning_compress.quantize_dequantize.default: quantize_dequantize_onnx,
            torch.ops.lightning_compress.dequantize.default: dequantize_onnx}


def qdq_onnx_bytes(qdq_network: nn.Module, example: tuple | torch.Tensor,
                   metadata: Mapping[str, Any] | None = None) -> bytes:
    """Export a network in QDQ form (:func:`qdq_network`) to int8 ONNX.

    Args:
        qdq_network: The QDQ-form network.
        example: An input batch (or a tuple of positional inputs) to export with.
        metadata: JSON-serializable; stored under :data:`~lightning_compress.core.onnx.METADATA_KEY`.

    Returns:
        The serialized QDQ ONNX model: int8 weight initializers, ``QuantizeLinear``/``DequantizeLinear``
        around every quantized value.

    Raises:
        RuntimeError: If the exporter cannot export the network.
        MissingExtraError: Without the ``[export]`` extra.

    Example:
        >>> from lightning_compress.quantization.prepare import calibrate, prepare
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)), mode="static")
        >>> _ = calibrate(prepared, [(torch.randn(8, 4),)])
        >>> blob = qdq_onnx_bytes(qdq_network(prepared), torch.randn(1, 4))
        >>> import onnx
        >>> sorted({node.op_type for node in onnx.load_from_string(blob).graph.node})  # x86: Clip of codes at 127
        ['Clip', 'DequantizeLinear', 'Gemm', 'QuantizeLinear']
    """
    require_onnx("ONNX export")
    return onnx_bytes(qdq_network, example, metadata, translations=onnx_translations())


_RELU_MODULES = (nni.ConvReLU1d, nni.ConvReLU2d, nni.ConvReLU3d, nni.LinearReLU, nniqat.ConvBnReLU1d,
                 nniqat.ConvBnReLU2d, nniqat.ConvBnReLU3d, nniqat.ConvReLU1d, nniqat.ConvReLU2d, nniqat.ConvReLU3d,
                 nniqat.LinearReLU)


def _activation_qdq(module: nn.Module, saturate_at_trained_range: bool) -> nn.Module | None:
    """The QDQ replacement of an activation observer / fake-quantizer (None: the value stays float)."""
    dtype = {torch.quint8: torch.uint8, torch.qint8: torch.int8}.get(getattr(module, "dtype", None))
    if dtype is None:
        return None
    if isinstance(module, FakeQuantizeBase):
        scale, zero_point = module.scale, module.zero_point
    else:
        scale, zero_point = module.calculate_qparams()
    quant_max = getattr(module, "quant_max", None) if saturate_at_trained_range else None  # x86: 127
    return QuantizeDequantize(float(scale.flatten()[0]), int(zero_point.flatten()[0]), dtype, quant_max)


def _weighted_qdq(module: nn.Module) -> nn.Module | None:
    """The QDQ replacement of a QAT or calibrated Conv/Linear (None: not quantized, stays as it is)."""
    fake_quant = getattr(module, "weight_fake_quant", None)
    qconfig = getattr(module, "qconfig", None)
    conv = weighted_layer(module)
    if (fake_quant is None and qconfig is None) or conv is None:
        return None
    weight, bias = folded_weight_and_bias(module)
    if fake_quant is None:  # static: the weight observer runs now, as torch's conversion runs it
        fake_quant = qconfig.weight()
        fake_quant(weight)
        scale, zero_point = fake_quant.calculate_qparams()
    else:
        scale, zero_point = fake_quant.scale, fake_quant.zero_point
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"{type(module).__name__}: expected one weight scale per output channel, got "
                         f"{scale.numel()} for {weight.shape[0]} channels")
    codes = quantize_weight(weight, scale, zero_point, fake_quant.quant_min, fake_quant.quant_max)
    dequantized = DequantizedWeight(codes, scale, zero_point)
    relu = isinstance(module, _RELU_MODULES)
    if isinstance(conv, nn.modules.conv._ConvNd):
        return QDQConv(conv, dequantized, bias, relu)
    return QDQLinear(dequantized, bias, relu)


def qdq_network(prepared: fx.GraphModule, saturate_at_trained_range: bool = True) -> fx.GraphModule:
    """The QDQ form of a QAT-trained or PTQ-calibrated network, with its learned quantization parameters.

    Activation fake-quantizers / observers become :class:`QuantizeDequantize`; quantized Conv/Linear (BN
    folded in) read int8 weight codes at their per-channel scales; modules kept in fp32 stay. The result is a
    plain fp32 network whose ONNX export (:func:`qdq_onnx_bytes`) computes exactly what it computes: on every
    engine what the fake-quant model and the engine's int8 model compute, activations of the x86 engines
    saturated at code 127 as they trained (``docs/quantization-design.md``). A clamp (ReLU6, hardtanh, a fused
    ReLU) that the quantization right after it makes redundant (``Q(clamp(x)) == Q(x)``, checked per clamp) is
    removed, so onnxruntime fuses ``Conv -> QuantizeLinear``.

    Args:
        prepared: A module from :func:`~lightning_compress.quantization.prepare.prepare` (``"qat"`` or
            calibrated ``"static"``); left unchanged.
        saturate_at_trained_range: Saturate activations at the largest code they trained with (127 on the x86
            engines). False gives the type's full range, which no engine computes (to measure what saturating
            costs).

    Returns:
        The QDQ-form network (CPU, eval mode).

    Example:
        >>> from lightning_compress.quantization.prepare import calibrate, prepare
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)), mode="static")
        >>> _ = calibrate(prepared, [(torch.randn(8, 4),)])
        >>> sorted({type(m).__name__ for m in qdq_network(prepared).modules()} - {"GraphModule"})
        ['DequantizedWeight', 'QDQLinear', 'QuantizeDequantize']
    """
    model = frozen_copy(prepared)
    replaced: dict[str, nn.Module | None] = {}
    for node in list(model.graph.nodes):
        if node.op != "call_module":
            continue
        if node.target not in replaced:
            module = model.get_submodule(node.target)
            if isinstance(module, (ObserverBase, FakeQuantizeBase)):
                replaced[node.target] = _activation_qdq(module, saturate_at_trained_range)
            else:
                replaced[node.target] = _weighted_qdq(module) or module
                if replaced[node.target] is module:
                    continue
            if replaced[node.target] is not None:
                model.set_submodule(node.target, replaced[node.target])
        if replaced[node.target] is None:  # a float value: the observer disappears
            node.replace_all_uses_with(node.args[0])
            model.graph.erase_node(node)
    _drop_saturated_clamps(model)
    model.graph.lint()
    model.recompile()
    model.delete_all_unused_submodules()
    return model.eval()


def _clamp_bounds(model: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """``(low, high)`` of a clamping node (ReLU6/hardtanh module or function, a QDQ layer's ReLU), else None."""
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        if isinstance(module, nn.Hardtanh):  # ReLU6 included
            return float(module.min_val), float(module.max_val)
        if isinstance(module, (QDQConv, QDQLinear)) and module.relu:
            return 0.0, float("inf")
    elif node.op == "call_function" and node.target is nn.functional.relu6:
        return 0.0, 6.0
    elif node.op == "call_function" and node.target is nn.functional.hardtanh:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        if isinstance(low, (int, float)) and isinstance(high, (int, float)):
            return float(low), float(high)
    return None


def _drop_saturated_clamps(model: fx.GraphModule) -> None:
    """Remove each clamp that the quantization right after it makes redundant (see :func:`qdq_network`)."""
    for node in list(model.graph.nodes):
        bounds = _clamp_bounds(model, node)
        if bounds is None or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        quantize = model.get_submodule(user.target) if user.op == "call_module" else None
        if not isinstance(quantize, QuantizeDequantize) or not quantize.saturates_outside(*bounds):
            continue
        if node.op == "call_module" and not isinstance(model.get_submodule(node.target), nn.Hardtanh):
            model.get_submodule(node.target).relu = False  # a QDQ layer keeps its conv, loses its ReLU
        else:
            node.replace_all_uses_with(node.args[0])
            model.graph.erase_node(node)
