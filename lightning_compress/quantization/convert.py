"""Turn a prepared network into the int8 model its engine runs, with the graph fixes torch's needs.

Example:
    >>> from lightning_compress.quantization.prepare import prepare
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> prepared = prepare(net, "x86")
    >>> _ = prepared(torch.randn(2, 3, 8, 8))
    >>> int8 = convert(prepared)
    >>> type(int8.get_submodule("0")).__name__
    'ConvReLU2d'
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from lightning_compress.core.onnx import OnnxRuntimeNetwork
from lightning_compress.quantization.deprecations import quiet_torch_ao
from lightning_compress.quantization.engines import Engine, KernelFamily, check_engine, reduced_range_max
from lightning_compress.quantization.prepare import is_prepared
from lightning_compress.quantization.qdq import qdq_network, qdq_onnx_bytes

with quiet_torch_ao():
    from torch.ao.quantization import FixedQParamsFakeQuantize, FixedQParamsObserver
    from torch.ao.quantization.quantize_fx import convert_fx


def convert(prepared: nn.Module, engine: str | Engine = "x86", example_inputs: tuple | None = None) -> nn.Module:
    """Convert a prepared module to a real int8 model for ``engine`` (CPU only), in eval mode.

    Torch's engines: torch's FX conversion, with reduced-range activations saturated at code 127 again
    (:func:`clamp_to_reduced_range`); sets ``torch.backends.quantized.engine`` process-wide, as torch requires.
    ONNX engines: the QDQ ONNX model run by onnxruntime
    (:class:`~lightning_compress.core.onnx.OnnxRuntimeNetwork`), the file a deployment ships.
    ``prepared`` itself is moved to CPU and left prepared.

    Args:
        prepared: A module from :func:`~lightning_compress.quantization.prepare.prepare` (calibrated or
            QAT-trained).
        engine: One of :data:`~lightning_compress.quantization.engines.ENGINES`.
        example_inputs: Positional inputs to export with; required for the ONNX engines.

    Returns:
        The int8 model.

    Raises:
        ValueError: If ``prepared`` was never prepared, on an unknown engine, or without
            ``example_inputs`` for an ONNX engine.

    Example:
        >>> convert(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        ValueError: convert needs a prepared model (from prepare / QuantizationAwareTraining / calibration); Linear was never prepared
    """
    engine = check_engine(engine)
    if not is_prepared(prepared) or not isinstance(prepared, fx.GraphModule):
        raise ValueError(
            "convert needs a prepared model (from prepare / QuantizationAwareTraining / calibration); "
            f"{type(prepared).__name__} was never prepared"
        )
    if engine.family is KernelFamily.QDQ_ONNX:
        if example_inputs is None:
            raise ValueError(f"engine {engine.name!r} exports the network to ONNX: pass example_inputs")
        return OnnxRuntimeNetwork(qdq_onnx_bytes(qdq_network(prepared.cpu()), tuple(example_inputs)))
    torch.backends.quantized.engine = engine.name
    # the fixed full-range qparams of sigmoid, tanh, softmax: read before convert_fx consumes the quantizers
    full_range = {(float(m.scale), int(m.zero_point)) for m in prepared.modules()
                  if isinstance(m, (FixedQParamsFakeQuantize, FixedQParamsObserver))}
    with quiet_torch_ao():
        int8 = _keepdim_means(convert_fx(prepared.cpu().eval()))
    return _clamped_activations(int8, full_range) if engine.reduced_range else int8


def clamp_to_reduced_range(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its codes above 127 saturated, if it is a ``quint8`` tensor (else ``x`` itself).

    Fake-quantization saturated at 127, and codes above overflow the int16 pair sums of x86 kernels
    (``docs/quantization-design.md``): :func:`convert` puts this after every reduced-range activation.

    Args:
        x: A layer's input.

    Returns:
        ``x`` clamped to codes 0..127 (same scale and zero-point), or ``x`` unchanged.

    Example:
        >>> q = torch.quantize_per_tensor(torch.tensor([0.0, 1.0, 2.0]), 0.01, 0, torch.quint8)
        >>> clamp_to_reduced_range(q).int_repr().tolist()
        [0, 100, 127]
    """
    if not x.is_quantized or x.dtype != torch.quint8:
        return x
    return torch.clamp(x, max=reduced_range_max(x.q_scale(), x.q_zero_point()))


fx.wrap("clamp_to_reduced_range")

_QUANTIZED_MODULES = ("torch.ao.nn.quantized.modules", "torch.ao.nn.intrinsic.quantized.modules")


def _sets_reduced_range(int8: fx.GraphModule, node: fx.Node, full_range: set[tuple[float, int]]) -> bool:
    """Whether ``node`` gives its value a scale and zero-point of its own on the reduced range: a quantization,
    a quantized module or a ``quantized::`` op, unless they are the fixed full-range ones of sigmoid, tanh or
    softmax (``full_range``). Other ops keep their input's (pooling, ReLU, reshapes)."""
    if node.op == "call_function" and str(getattr(node.target, "_qualified_op_name", "")).startswith("quantized::"):
        return True
    if node.target is torch.quantize_per_tensor:
        scale, zero_point = (operator.attrgetter(arg.target)(int8) if isinstance(arg, fx.Node) else arg
                             for arg in node.args[1:3])
    elif node.op == "call_module" and type(int8.get_submodule(node.target)).__module__.startswith(_QUANTIZED_MODULES):
        scale, zero_point = (getattr(int8.get_submodule(node.target), key, None) for key in ("scale", "zero_point"))
        if zero_point is None:
            return False
    else:
        return False
    return (float(scale), int(zero_point)) not in full_range


def _clamped_activations(int8: fx.GraphModule, full_range: set[tuple[float, int]]) -> fx.GraphModule:
    """Put :func:`clamp_to_reduced_range` after each node of a converted model that sets reduced-range qparams
    (:func:`_sets_reduced_range`): every value fake-quantization saturated at code 127."""
    graph = int8.graph
    for node in [node for node in graph.nodes if _sets_reduced_range(int8, node, full_range)]:
        with graph.inserting_after(node):
            clamped = graph.call_function(clamp_to_reduced_range, (node,))
        node.replace_all_uses_with(clamped, delete_user_cb=lambda user, clamped=clamped: user is not clamped)
    graph.lint()
    int8.recompile()
    return int8


def _keepdim_means(int8: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``x.mean(dims)`` as ``x.mean(dims, keepdim=True).squeeze(dims)`` in a converted model.

    torch's quantized ``mean`` that drops the reduced dims fails on a channels_last 4-D input whose
    reduced dims are 1x1 ("required rank 4 tensor to use channels_last format"): a global average
    pool written as ``x.mean([2, 3])`` after the last conv, as in torchvision's ShuffleNetV2 at 32x32
    inputs. Keeping the dims and squeezing them gives the same values, quantized or not.
    """
    graph, changed = int8.graph, False
    for node in list(graph.nodes):
        if not ((node.op == "call_method" and node.target == "mean")
                or (node.op == "call_function" and node.target is torch.mean)):
            continue
        kwargs = dict(node.kwargs)
        dims = node.args[1] if len(node.args) > 1 else kwargs.pop("dim", None)
        keepdim = node.args[2] if len(node.args) > 2 else kwargs.pop("keepdim", False)
        if keepdim or not isinstance(dims, (int, list, tuple)):
            continue
        node.args, node.kwargs = (node.args[0], dims), {**kwargs, "keepdim": True}
        with graph.inserting_after(node):
            squeezed = graph.call_function(torch.squeeze, (node, tuple(dims) if isinstance(dims, (list, tuple)) else dims))
        node.replace_all_uses_with(squeezed, delete_user_cb=lambda user: user is not squeezed)
        changed = True
    if changed:
        graph.lint()
        int8.recompile()
    return int8
