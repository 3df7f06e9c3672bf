"""QDQ building blocks: fake-quantization as two custom ops that export to ONNX QuantizeLinear/DequantizeLinear.

A network in *QDQ form* is a plain fp32 ``nn.Module`` in which every quantized activation passes
through :func:`quantize_dequantize` (per-tensor scale and zero-point; the zero-point's dtype, ``uint8`` or
``int8``, is the 8-bit type) and every quantized weight is stored as ``int8`` and read through
:func:`dequantize` (per output channel). In torch the two ops compute exactly what ONNX's
``QuantizeLinear``/``DequantizeLinear`` compute (``round(x / scale)`` half to even, saturated to the
type's range), so the QDQ-form network is the fake-quant model onnxruntime runs, and
:func:`qdq_onnx_bytes` exports it through ``torch.export`` (no TorchScript, no quantized tensors):
onnxruntime then fuses each ``DequantizeLinear -> Conv -> QuantizeLinear`` into an int8 kernel.

:func:`lightning_compress.quantization.backend.qdq_network` builds the QDQ form from a QAT-trained or
PTQ-calibrated network, with its learned scales and zero-points.

Example:
    >>> x = torch.tensor([-1.0, 0.04, 0.06, 3.0])
    >>> quantize_dequantize(x, torch.tensor(0.1), torch.tensor(0, dtype=torch.uint8))
    tensor([0.0000, 0.0000, 0.1000, 3.0000])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


@torch.library.custom_op("lightning_compress::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Per-tensor ``DequantizeLinear(QuantizeLinear(x))`` with ONNX's rounding and saturation.

    Args:
        x: Any float tensor.
        scale: 0-d float32 scale.
        zero_point: 0-d ``uint8`` or ``int8`` zero-point (its dtype sets the range: 0..255 or -128..127).

    Returns:
        ``x`` rounded to the 8-bit grid, in float.
    """
    low, high = _RANGES[zero_point.dtype]
    zero = zero_point.float()
    return (torch.clamp(torch.round(x / scale) + zero, low, high) - zero) * scale


@quantize_dequantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
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

    Example:
        >>> QuantizeDequantize(0.5, 0, torch.int8)(torch.tensor([0.2, 0.3, 100.0]))
        tensor([ 0.0000,  0.5000, 63.5000])
    """

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype not in _RANGES:
            raise ValueError(f"dtype must be one of {list(_RANGES)}, got {dtype}")
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.scale, self.zero_point)

    def saturates_outside(self, low: float, high: float) -> bool:
        """Whether ``low`` and ``high`` already quantize to the ends of the 8-bit range.

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
