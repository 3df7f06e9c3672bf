"""PT2E: the network captured by ``torch.export`` and quantized by its engine's torchao quantizer.

The PT2E family (:attr:`~lightning_compress.quantization.engines.KernelFamily.PT2E`, the ``[pt2e]`` extra): the
network is exported with a dynamic batch dimension, annotated by the engine's quantizer (``X86InductorQuantizer``)
and prepared by torchao; :func:`convert` gives the quantize/dequantize graph a compiler lowers to int8 kernels
(Inductor / AOTInductor). The numerics are the FX family's (``qconfigs.py``): int8 symmetric per-channel weights
within the engine's ``weight_quant_max`` through the plain ``FakeQuantize``, 8-bit per-tensor affine activations.

An exported graph bakes ``training`` into each batch norm and dropout. torchao's switch
(``move_exported_model_to_eval``) rewrites them with default eps and momentum and takes seconds per call, so here a
:class:`GraphMode` submodule feeds those ops the module's mode: ``train()``/``eval()`` and Lightning's restoring
of the flags after validation work as on an eager network. Fake-quantizers observe in training only.
:func:`convert` folds the QAT Conv-BN pattern itself; torchao's fold exports 96 patterns whatever the network
(about 15 s on a fast CPU, over a minute on 2 busy cores).

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> prepared = prepare(net, mode="static", example_inputs=(torch.randn(2, 3, 8, 8),))
    >>> calibrate(prepared, [(torch.randn(4, 3, 8, 8),)])
    1
    >>> int8 = convert(prepared)
    >>> is_pt2e_prepared(prepared), is_pt2e_prepared(int8), tuple(int8(torch.randn(5, 3, 8, 8)).shape)
    (True, False, (5, 4, 6, 6))
"""

from __future__ import annotations

import contextlib
import copy
import logging
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from lightning_compress.quantization.engines import REDUCED_QUANT_MAX, Engine, KernelFamily, check_engine
from lightning_compress.quantization.observers import calibrate  # noqa: F401  (part of this module's API)


@contextlib.contextmanager
def _quiet_pytree_log() -> Iterator[None]:
    """torchao 0.18 registers an Enum with torch's pytree, which torch 2.14 logs a warning about at import."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


with _quiet_pytree_log():
    from torchao.quantization.pt2e import (
        FakeQuantize,
        FakeQuantizeBase,
        FusedMovingAvgObsFakeQuantize,
        HistogramObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        ObserverBase,
        PerChannelMinMaxObserver,
        disable_observer,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec, Quantizer
    from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

MODES: tuple[str, ...] = ("qat", "static")
"""What preparation inserts: fake-quantization for training, or observers for calibration."""

def _xnnpack_quantizer() -> Quantizer:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer  # [executorch] extra only

    return XNNPACKQuantizer()


_QUANTIZERS: dict[str, Callable[[], Quantizer]] = {"x86_inductor": X86InductorQuantizer, "xnnpack": _xnnpack_quantizer}
"""Each PT2E engine's quantizer (torchao's; ExecuTorch's for ``xnnpack``)."""

_aten = torch.ops.aten
_MODE_ARGS = {_aten.batch_norm.default: 5, _aten.dropout.default: 2, _aten.feature_dropout.default: 2,
              _aten.alpha_dropout.default: 2, _aten.feature_alpha_dropout.default: 2}
"""Ops whose behaviour follows the mode, and the position of their ``training`` argument."""
_CONVS = (_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default)
MODE_MODULE = "graph_mode"
"""Name of the :class:`GraphMode` submodule in a prepared graph."""


class GraphMode(nn.Module):
    """The ``training`` argument of an exported graph's batch norms and dropouts: the module's mode.

    Batch norms also run on running statistics in training once frozen (:func:`freeze_bn`); the flag is saved
    in the state dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bn_frozen = False

    def forward(self, batch_norm: bool) -> bool:
        return self.training and not (batch_norm and self.bn_frozen)

    def get_extra_state(self) -> dict[str, bool]:
        return {"bn_frozen": self.bn_frozen}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.bn_frozen = bool(state["bn_frozen"])


class _Float32Input:
    """Observers and the fused fake-quant kernel take fp32 under bf16/fp16 autocast; 8-bit codes times a scale
    survive the cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return super().forward(x)


class _ObservesInTraining(_Float32Input):
    """A fake-quantizer whose ranges move in training only: evaluation quantizes with the trained ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not bool(self.observer_enabled[0]):
            return super().forward(x)
        self.observer_enabled[0] = 0
        try:
            return super().forward(x)
        finally:
            self.observer_enabled[0] = 1


class _ActivationFakeQuantize(_ObservesInTraining, FusedMovingAvgObsFakeQuantize):
    pass


class _WeightFakeQuantize(_ObservesInTraining, FakeQuantize):
    pass


class _ActivationObserver(_Float32Input, HistogramObserver):
    pass


class _WeightObserver(_Float32Input, PerChannelMinMaxObserver):
    pass


def quantization_config(engine: Engine, mode: str) -> QuantizationConfig:
    """What the engine's quantizer puts on activations and weights (numerics as ``qconfigs.py``).

    Weights: codes within the engine's ``weight_quant_max``, the plain ``FakeQuantize`` over the current range
    (``averaging_constant=1``), whose scales are the ones :func:`convert` quantizes with; the fused kernel rounds
    per-channel scales its own way (0.4 % off).
    Activations: torchao's x86 recipe (fused kernel, ``eps=2**-12``), on 0..127 for reduced-range engines, int8
    -128..127 for engines with signed activations (XNNPACK).

    Args:
        engine: A PT2E engine.
        mode: One of :data:`MODES`.

    Returns:
        torchao's quantization config.
    """
    qat = mode == "qat"
    activations = (_ActivationFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=2**-12) if qat
                   else _ActivationObserver.with_args(eps=2**-12))
    weights = (_WeightFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0)
               if qat else _WeightObserver)
    low, high = (-128, 127) if engine.signed_activations else (0, REDUCED_QUANT_MAX if engine.reduced_range else 255)
    activation = QuantizationSpec(torch.int8 if engine.signed_activations else torch.uint8, activations,
                                  quant_min=low, quant_max=high, qscheme=torch.per_tensor_affine)
    weight = QuantizationSpec(torch.int8, weights, quant_min=-engine.weight_quant_max,
                              quant_max=engine.weight_quant_max, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QuantizationConfig(activation, activation, weight, None, is_qat=qat)


def export_network(network: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """``torch.export``'s graph of ``network`` (in its current mode), dim 0 of every tensor input dynamic.

    Args:
        network: The network.
        example_inputs: Positional inputs with a batch of at least 2 (export fixes a batch of 1).

    Returns:
        The exported graph, sharing ``network``'s parameters.

    Raises:
        ValueError: If an input has no batch of 2 or more, or torch.export cannot capture the network.
    """
    inputs = tuple(example_inputs)
    shapes = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
    if not shapes or any(len(shape) == 0 or shape[0] < 2 for shape in shapes):
        raise ValueError(f"example_inputs must be tensors with a batch of at least 2 (torch.export fixes a batch "
                         f"of 1), got shapes {shapes}")
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) else None for x in inputs)
    try:
        return torch.export.export(network, inputs, dynamic_shapes=dynamic).module()
    except Exception as err:  # torch.export raises many types
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"torch.export cannot capture {type(network).__name__} with a dynamic batch size "
                         f"({type(err).__name__}: {first}); use an FX engine, or make the network exportable") from err


def prepare(network: nn.Module, engine: str | Engine = "x86_inductor", mode: str = "qat", skip: Sequence[str] = (),
            *, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Export ``network`` and insert the engine's fake-quantization (QAT) or observers (static PTQ).

    ``network`` is put in train mode for ``"qat"`` (Conv-BN fused as torchao's QAT pattern) and eval mode
    otherwise (BN folded into the conv). The QAT graph shares ``network``'s parameters (checked), so an optimizer
    built before keeps training them; deep-copy ``network`` first to leave it untouched.

    Args:
        network: The fp32 network.
        engine: A PT2E engine (:data:`~lightning_compress.quantization.engines.PT2E_ENGINES`).
        mode: One of :data:`MODES`.
        skip: Module names (relative to ``network``) kept in fp32.
        example_inputs: Positional inputs to export with (batch >= 2; other batch sizes run later).

    Returns:
        The prepared graph, following ``train()``/``eval()`` (:class:`GraphMode`).

    Raises:
        ValueError: On a non-PT2E engine, an unknown mode or skip name, a network torch.export cannot capture,
            or (QAT) a BatchNorm scale of exactly 0.
        RuntimeError: If the QAT graph no longer holds the network's ``Parameter`` objects.
    """
    engine = check_engine(engine, families=(KernelFamily.PT2E,))
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    modules = dict(network.named_modules())
    unknown = [name for name in skip if not name or name not in modules]
    if unknown:
        raise ValueError(f"skip names {unknown} are not submodules of {type(network).__name__}")
    network.train(mode == "qat")
    before = {id(p) for p in network.parameters()}
    quantizer = _QUANTIZERS[engine.name]().set_global(quantization_config(engine, mode))
    if hasattr(quantizer, "set_module_name_qconfig"):
        for name in skip:
            quantizer.set_module_name_qconfig(name, None)
    elif skip:  # XNNPACKQuantizer takes no "None" config: leave the skipped modules' nodes out by a filter
        skipped = [get_module_name_filter(name) for name in skip]
        quantizer.set_filter_function(lambda node: not any(inside(node) for inside in skipped))
    exported = export_network(network, example_inputs)
    if mode == "qat":
        _check_bn_scales(exported)
    prepared = (prepare_qat_pt2e if mode == "qat" else prepare_pt2e)(exported, quantizer)
    if mode == "qat" and not {id(p) for p in prepared.parameters()} <= before:
        raise RuntimeError(f"PT2E preparation no longer keeps the network's Parameter objects (torch "
                           f"{torch.__version__}); optimizers and pruning masks would train stale tensors")
    _follow_module_mode(prepared)
    return prepared.train(mode == "qat")


def _check_bn_scales(exported: fx.GraphModule) -> None:
    """Refuse a BatchNorm scale (gamma) with exact zeros: QAT's Conv-BN pattern divides by it (NaN at once)."""
    zero = [node.args[1].target for node in exported.graph.nodes if node.target is _aten.batch_norm.default
            and getattr(node.args[1], "op", None) == "get_attr"
            and bool((operator.attrgetter(node.args[1].target)(exported) == 0).any())]
    if zero:
        raise ValueError(f"cannot start quantization-aware training: the BatchNorm scale (gamma) is exactly 0 in "
                         f"{zero[:3]} (zero-initialised residual branches), and QAT's Conv-BN folding divides by it; "
                         "start QAT after some fp32 training")


def _follow_module_mode(graph_module: fx.GraphModule) -> None:
    """Feed every mode-dependent op the output of a :class:`GraphMode` submodule, and allow ``train()``/``eval()``
    (torch.export and torchao replace both with methods that raise)."""
    for method in ("train", "eval"):
        graph_module.__dict__.pop(method, None)
    graph = graph_module.graph
    ops = [node for node in graph.nodes if node.op == "call_function" and node.target in _MODE_ARGS
           and len(node.args) > _MODE_ARGS[node.target] and isinstance(node.args[_MODE_ARGS[node.target]], bool)]
    if not ops:
        return
    if not hasattr(graph_module, MODE_MODULE):
        graph_module.add_submodule(MODE_MODULE, GraphMode())
    with graph.inserting_before(ops[0]):
        flags = {is_bn: graph.call_module(MODE_MODULE, (is_bn,)) for is_bn in (True, False)}
    for node in ops:
        args = list(node.args)
        args[_MODE_ARGS[node.target]] = flags[node.target is _aten.batch_norm.default]
        node.args = tuple(args)
    for flag in flags.values():
        if not flag.users:
            graph.erase_node(flag)
    graph.lint()
    graph_module.recompile()


def is_pt2e_prepared(module: nn.Module) -> bool:
    """Whether ``module`` carries torchao's observers or fake-quantization (came from :func:`prepare`).

    Example:
        >>> is_pt2e_prepared(nn.Linear(2, 2))
        False
    """
    return any(isinstance(m, (ObserverBase, FakeQuantizeBase)) for m in module.modules())


def freeze_observers(prepared: nn.Module) -> None:
    """Stop updating quantization ranges in training too (saved with the fake-quantizers' state)."""
    prepared.apply(disable_observer)


def freeze_bn(prepared: nn.Module) -> None:
    """Run batch norms on their running statistics in training too (saved in :class:`GraphMode`'s state)."""
    for module in prepared.modules():
        if isinstance(module, GraphMode):
            module.bn_frozen = True


def weight_quantization_errors(prepared: fx.GraphModule) -> dict[str, float]:
    """Relative error ``||fq(w) - w|| / ||w||`` of each fake-quantized (BN-folded) weight at its current scale,
    by the name of the layer owning the weight; layers whose observer has not run yet are left out. Pure.

    Example:
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)), example_inputs=(torch.randn(2, 4),))
        >>> _ = prepared(torch.randn(3, 4))
        >>> list(weight_quantization_errors(prepared))
        ['0']
    """
    errors, values = {}, _constants(prepared)
    modules = dict(prepared.named_modules())
    for node in prepared.graph.nodes:
        fq = modules.get(node.target) if node.op == "call_module" else None
        if not (isinstance(fq, FakeQuantizeBase) and node.args and node.args[0] in values):
            continue
        weight, owner = values[node.args[0]], _weight_owner(node.args[0])
        if owner is None or fq.scale.numel() != weight.shape[0]:
            continue
        with torch.no_grad():
            quantized = torch.fake_quantize_per_channel_affine(
                weight.float(), fq.scale, fq.zero_point.to(torch.int32), fq.ch_axis, fq.quant_min, fq.quant_max)
            errors[owner] = float((quantized - weight).norm() / weight.norm().clamp_min(1e-12))
    return errors


def _weight_owner(node: fx.Node) -> str | None:
    """The module owning the first ``.weight`` attribute a weight value is computed from (``"conv1"``)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr" and str(current.target).endswith(".weight"):
            return str(current.target).rsplit(".", 1)[0]
        stack.extend(reversed(current.all_input_nodes))
    return None


def activation_scales(prepared: fx.GraphModule) -> dict[str, float]:
    """Current scale of each activation fake-quantizer, named after the graph value it quantizes.

    Example:
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)), example_inputs=(torch.randn(2, 4),))
        >>> _ = prepared(torch.randn(3, 4))
        >>> sorted(activation_scales(prepared))
        ['input_1']
    """
    values, modules = _constants(prepared), dict(prepared.named_modules())
    return {node.args[0].name: float(module.scale.flatten()[0]) for node in prepared.graph.nodes
            if node.op == "call_module" and isinstance(module := modules.get(node.target), FakeQuantizeBase)
            and node.args and isinstance(node.args[0], fx.Node) and node.args[0] not in values}


def frozen_copy(prepared: fx.GraphModule) -> fx.GraphModule:
    """A copy (CPU, eval mode) whose quantization parameters no longer move: what :func:`convert` quantizes.

    Each weight fake-quantizer still observing first sees its current (BN-folded) weight, as QAT would at the
    next step: the copy computes the int8 model's numerics.

    Args:
        prepared: A graph from :func:`prepare`.

    Returns:
        The frozen copy.
    """
    model = copy.deepcopy(prepared).cpu()
    values = _constants(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for node in model.graph.nodes:
            quantizer = modules.get(node.target) if node.op == "call_module" else None
            if (isinstance(quantizer, FakeQuantizeBase) and node.args and node.args[0] in values
                    and bool(quantizer.observer_enabled[0])):
                quantizer.train()(values[node.args[0]])
    model.apply(disable_observer)
    return model.eval()


def convert(prepared: fx.GraphModule, int32_bias: bool = False) -> fx.GraphModule:
    """The quantize/dequantize graph of a prepared (QAT-trained or calibrated) graph, in eval mode.

    It runs in eager mode as the int8 model computes (integer weights, activations rounded to their codes);
    a compiler (Inductor) lowers it to int8 kernels. ``prepared`` is left as it is.

    Args:
        prepared: A graph from :func:`prepare`.
        int32_bias: Round the biases of int8 convolutions and linears to int32 codes
            (:func:`round_biases_to_int32`), for an engine whose kernels add them so
            (:attr:`~lightning_compress.quantization.engines.Engine.int32_bias`).

    Returns:
        The converted graph (batch size still dynamic).

    Raises:
        ValueError: If ``prepared`` was never prepared.
    """
    if not isinstance(prepared, fx.GraphModule) or not is_pt2e_prepared(prepared):
        raise ValueError(f"convert needs a graph from pt2e.prepare; {type(prepared).__name__} was never prepared")
    model = frozen_copy(prepared)
    _fold_conv_bn(model)
    int8 = convert_pt2e(model)
    _follow_module_mode(int8)
    if int32_bias:
        round_biases_to_int32(int8)
    return int8.eval()


_q = torch.ops.quantized_decomposed
_ACTIVATIONS_FUSED = (_aten.relu.default, _aten.relu_.default, _aten.hardtanh.default, _aten.hardtanh_.default,
                      _aten.clamp.default)
"""Activations an int8 kernel applies before quantizing its output (ExecuTorch fuses them into the op)."""


def round_biases_to_int32(graph_module: fx.GraphModule) -> int:
    """Round each int8 convolution's and linear's float bias to what an int32-bias kernel adds, in place.

    An op is int8 when its input is quantized per tensor, its weight per channel or per tensor, and its output
    (after a fused activation) quantized: XNNPACK then adds the bias as ``round(bias / (input scale x weight
    scale))`` int32 codes, which can move an output across a rounding boundary that the float bias would not.

    Args:
        graph_module: A converted graph (:func:`convert`).

    Returns:
        How many biases were rounded.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
        >>> prepared = prepare(net, mode="static", example_inputs=(torch.randn(2, 3, 8, 8),))
        >>> calibrate(prepared, [(torch.randn(4, 3, 8, 8),)])
        1
        >>> round_biases_to_int32(convert(prepared))  # the last conv's output is not quantized: its bias stays
        1
    """
    graph, values = graph_module.graph, _constants(graph_module)
    rounded = 0
    for op in [node for node in graph.nodes if node.target in (*_CONVS, _aten.linear.default)]:
        scale = _bias_scale(op, values)
        if scale is None:
            continue
        bias = values[op.args[2]]
        codes = _q.quantize_per_channel.default(bias, scale, torch.zeros_like(scale, dtype=torch.int64), 0,
                                                -(2**31), 2**31 - 1, torch.int32)
        name = f"{op.name}_int32_bias"
        graph_module.register_buffer(name, (codes.double() * scale.double()).to(bias.dtype))
        with graph.inserting_before(op):
            op.args = (*op.args[:2], graph.get_attr(name), *op.args[3:])
        rounded += 1
    _erase_dead(graph)
    graph.lint()
    graph_module.recompile()
    return rounded


def _bias_scale(op: fx.Node, values: dict[fx.Node, Any]) -> torch.Tensor | None:
    """The int32 scale of ``op``'s bias (input scale x weight scale, per output channel), if ``op`` is int8."""
    if len(op.args) < 3 or op.args[2] not in values:
        return None
    x, weight, bias = op.args[:3]
    if getattr(x, "target", None) is not _q.dequantize_per_tensor.default:
        return None
    if getattr(weight, "target", None) is _q.dequantize_per_channel.default and weight.args[3] == 0:
        weight_scale = values[weight.args[1]].float()
    elif getattr(weight, "target", None) is _q.dequantize_per_tensor.default:
        weight_scale = torch.full(values[bias].shape, float(weight.args[1]))
    else:
        return None
    outputs = list(op.users)
    if len(outputs) == 1 and outputs[0].target in _ACTIVATIONS_FUSED:
        outputs = list(outputs[0].users)
    if not outputs or any(user.target is not _q.quantize_per_tensor.default for user in outputs):
        return None
    return weight_scale * float(x.args[1])


def _constants(graph_module: fx.GraphModule) -> dict[fx.Node, Any]:
    """The values of the nodes computed from parameters and buffers alone (no input, no mutation)."""
    values: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in graph_module.graph.nodes:
            if node.op == "get_attr":
                values[node] = operator.attrgetter(node.target)(graph_module)
            elif (node.op == "call_function" and node.all_input_nodes and not node.is_impure()
                  and all(n in values for n in node.all_input_nodes)):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
                values[node] = node.target(*args, **kwargs)
    return values


def _fold_conv_bn(graph_module: fx.GraphModule) -> None:
    """Fold each eval-mode batch norm of torchao's QAT Conv-BN pattern into its conv's bias.

    In eval, ``bn(conv(x, fq(w * s)) / s [+ b])`` with ``s = gamma / sqrt(var + eps)`` is
    ``conv(x, fq(w * s)) + (b - mean) * s + beta``; the weight path stays, and convert folds it into int8
    weights. A batch norm in another pattern is left (in eval mode) to torchao's own, slower fold.
    """
    graph, values = graph_module.graph, _constants(graph_module)
    modules = dict(graph_module.named_modules())
    for bn in [node for node in graph.nodes if node.target is _aten.batch_norm.default]:
        folded = _conv_bn_fold(bn, values, modules)
        if folded is None:
            bn.args = (*bn.args[:5], False, *bn.args[6:])
            continue
        conv, bias = folded
        name = f"{conv.name}_folded_bias"
        graph_module.register_buffer(name, bias)
        with graph.inserting_before(conv):
            conv.args = (*conv.args[:2], graph.get_attr(name), *conv.args[3:])
        stats = bn.args[3].target.rsplit(".", 1)[0] + ".num_batches_tracked"
        bn.replace_all_uses_with(conv)
        graph.erase_node(bn)
        for node in [n for n in graph.nodes if n.target is _aten.add_.Tensor
                     and getattr(n.args[0], "target", None) == stats]:
            graph.erase_node(node)
    _erase_dead(graph)
    graph.lint()
    graph_module.recompile()


def _erase_dead(graph: fx.Graph) -> None:
    """Erase the unused pure ops and :class:`GraphMode` calls (not ``eliminate_dead_code``: export's guards have
    no users)."""
    for node in reversed(graph.nodes):
        if not node.users and (node.op in ("call_function", "get_attr") and not node.is_impure()
                               or node.op == "call_module" and node.target == MODE_MODULE):
            graph.erase_node(node)


def _conv_bn_fold(bn: fx.Node, values: dict[fx.Node, Any], modules: dict[str, nn.Module]
                  ) -> tuple[fx.Node, torch.Tensor] | None:
    """``(conv, folded bias)`` if ``bn`` ends torchao's QAT Conv-BN pattern, else None."""
    x, bias = bn.args[0], None
    if getattr(x, "target", None) is _aten.add.Tensor and len(x.users) == 1 and x.args[1] in values:
        bias = values[x.args[1]].flatten()
        x = x.args[0]
    if getattr(x, "target", None) is not _aten.div.Tensor or len(x.users) != 1 or x.args[1] not in values:
        return None
    conv = x.args[0]
    if getattr(conv, "target", None) not in _CONVS or len(conv.users) != 1:
        return None
    weight = conv.args[1]
    if not (weight.op == "call_module" and isinstance(modules.get(weight.target), FakeQuantizeBase)):
        return None
    if len(conv.args) > 2 and conv.args[2] is not None and not (
            conv.args[2] in values and not values[conv.args[2]].any()):  # torchao's zero bias
        return None
    gamma, beta, mean, var = (values.get(arg) for arg in bn.args[1:5])
    if any(t is None for t in (gamma, beta, mean, var)):
        return None
    scale = gamma / torch.sqrt(var + bn.args[7])
    if values[x.args[1]].shape != (1, len(scale)) + (1,) * (values[x.args[1]].dim() - 2) or not torch.allclose(
            values[x.args[1]].flatten(), scale):
        return None
    bias = (torch.zeros_like(mean) if bias is None else bias) - mean
    return conv, (bias * scale + beta).detach().clone()
