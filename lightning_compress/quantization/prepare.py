"""Put fake-quantization or observers into a network, drive them, and read what they learned.

torch.ao's FX graph mode, which keeps the network's ``Parameter`` objects (so optimizers and pruning masks
keep applying); why FX and not torchao's PT2E flow: ``docs/quantization-design.md``. A ``torch.compile``
wrapper is seen through: the module inside is prepared, and the prepared module runs uncompiled (torch.ao's
quantizers are on dynamo's skip list, so compiling them gains nothing).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn

from lightning_compress.core.layers import matches_any, unwrap_compiled
from lightning_compress.quantization.deprecations import quiet_torch_ao
from lightning_compress.quantization.engines import Engine, check_engine
from lightning_compress.quantization.observers import calibrate  # noqa: F401  (part of this module's API)
from lightning_compress.quantization.qconfigs import MODES, backend_config, qconfig_mapping
from lightning_compress.quantization.tracing import check_traceable, traceable_network

with quiet_torch_ao():
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase, disable_observer
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx


UNCOMPILED_NOTE = ("was compiled with torch.compile; its quantized version runs uncompiled: torch.compile does not "
                   "trace torch.ao's quantization modules (a graph break at each, no faster)")
"""Why a quantization callback leaves its network uncompiled (the ``torch.compile`` speed-up does not carry over)."""


def resolve_skip(network: nn.Module, patterns: Sequence[str], prefix: str = "") -> list[str]:
    """Turn glob patterns into the names of the submodules kept in fp32 (and not traced).

    Args:
        network: The network about to be quantized (a ``torch.compile`` wrapper: the module inside).
        patterns: Glob patterns matched against ``prefix + module name`` (e.g. ``"model.layer3.*"``).
        prefix: How the caller names the network (``"model."``), so patterns use full names.

    Returns:
        Module names relative to ``network``, outermost matches only.

    Raises:
        ValueError: If a pattern matches no submodule.

    Example:
        >>> resolve_skip(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU())), ["1*"])
        ['1']
    """
    names = [name for name, _ in unwrap_compiled(network).named_modules() if name]
    for pattern in patterns:
        if not any(matches_any(prefix + name, [pattern]) for name in names):
            shown = [prefix + n for n in names[:30]] + (["..."] if len(names) > 30 else [])
            raise ValueError(f"skip pattern {pattern!r} matches no module; modules are: {shown}")
    matched = [name for name in names if matches_any(prefix + name, patterns)]
    return [name for name in matched if not any(name.startswith(outer + ".") for outer in matched)]


def prepare(network: nn.Module, engine: str | Engine = "x86", mode: str = "qat",
            skip: Sequence[str] = ()) -> fx.GraphModule:
    """Insert fake-quantization (QAT) or observers (static / dynamic PTQ) into ``network``.

    ``network`` is put in train mode for ``"qat"`` (Conv-BN(-ReLU) become fused QAT modules that
    fold BN into the fake-quantized weight) and in eval mode otherwise (BN folded into the conv).
    For QAT the returned module shares its parameters with ``network`` (checked), so an optimizer
    built before keeps training them; deep-copy ``network`` first to leave it untouched.

    Args:
        network: The fp32 network (a ``torch.compile`` wrapper: the module inside; the result is uncompiled).
        engine: One of :data:`~lightning_compress.quantization.engines.ENGINES`.
        mode: One of :data:`~lightning_compress.quantization.qconfigs.MODES`.
        skip: Module names (relative to ``network``) kept in fp32 and not traced. Modules whose traced
            code would depend on ``self.training`` are added
            (:func:`~lightning_compress.quantization.tracing.traceable_network`).

    Returns:
        The prepared ``GraphModule``.

    Raises:
        ValueError: On an unknown engine or mode, or an untraceable network (see :func:`check_traceable`).
        RuntimeError: If QAT preparation no longer keeps the original ``Parameter`` objects.

    Example:
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)), mode="static")
        >>> is_prepared(prepared)
        True
    """
    engine = check_engine(engine)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    network = unwrap_compiled(network)
    check_traceable(network, skip)
    network.train(mode == "qat")
    before = {id(p) for p in network.parameters()}
    network, skip = traceable_network(network, skip)
    with quiet_torch_ao():
        mapping = qconfig_mapping(engine, mode)
        for name in skip:
            mapping.set_module_name(name, None)
        custom = PrepareCustomConfig().set_non_traceable_module_names(list(skip))
        prepare_fn = prepare_qat_fx if mode == "qat" else prepare_fx
        # FX wants example_inputs; torch 2.14 uses them only for standalone modules, which are not configured
        prepared = prepare_fn(network, mapping, (), prepare_custom_config=custom, backend_config=backend_config(engine))
    if mode == "qat" and {id(p) for p in prepared.parameters()} != before:  # eval-mode prepare folds BN
        raise RuntimeError(
            "FX preparation no longer keeps the network's Parameter objects (torch "
            f"{torch.__version__}); optimizers and pruning masks would train stale tensors"
        )
    if mode == "qat":
        _check_bn_scales(prepared)
    for module in prepared.modules():
        if isinstance(module, (ObserverBase, FakeQuantizeBase)):
            module.register_forward_pre_hook(_observe_in_float32)
    return prepared


def _check_bn_scales(prepared: fx.GraphModule) -> None:
    """Refuse fused Conv-BN QAT modules whose BatchNorm scale (gamma) has exact zeros.

    QAT folds BN into the conv weight and divides the conv output by ``gamma / std`` again, so a zero
    gamma yields NaN at the first forward. Networks initialise residual branches that way on purpose
    (timm's ``zero_init_last``, torchvision's ``zero_init_residual=True``); after some fp32 training the
    scales have moved off zero.
    """
    zero = [name for name, module in prepared.named_modules()
            if isinstance(module, _ConvBnNd) and bool((module.bn.weight == 0).any())]
    if zero:
        raise ValueError(
            f"cannot start quantization-aware training: the BatchNorm scale (gamma) is exactly 0 in {len(zero)} "
            f"Conv-BN layer(s) {zero[:3]}{' ...' if len(zero) > 3 else ''} (zero-initialised residual branches, e.g. "
            "timm's zero_init_last), and QAT's Conv-BN folding divides by it (NaN at the first step); start QAT "
            "after some fp32 training (start=0.5), or build the network without zero-initialised BatchNorm"
        )


def _observe_in_float32(module: nn.Module, args: tuple) -> tuple | None:
    """Feed observers and fake-quantization fp32 under mixed precision.

    Under ``bf16-mixed``/``16-mixed`` autocast a conv returns bf16/fp16, while the observers' ranges
    and the fused fake-quant kernel are fp32 ("expected scalar type Float but found BFloat16"). The
    quantization grid survives the cast back: 8-bit codes times a scale are exact in bf16 (8
    significant bits) and fp16.
    """
    if args and isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.bfloat16, torch.float16):
        return (args[0].float(), *args[1:])
    return None


def is_prepared(module: nn.Module) -> bool:
    """Whether ``module`` carries observers or fake-quantization (i.e. came from :func:`prepare`).

    Args:
        module: Any module.

    Returns:
        True if any submodule is an observer or fake-quantize module.

    Example:
        >>> is_prepared(nn.Linear(2, 2))
        False
    """
    return any(isinstance(m, (ObserverBase, FakeQuantizeBase)) for m in module.modules())


def freeze_observers(prepared: nn.Module) -> None:
    """Stop updating quantization ranges (scales and zero-points stay as observed so far).

    Args:
        prepared: A prepared module.

    Example:
        >>> freeze_observers(prepare(nn.Sequential(nn.Linear(4, 2))))
    """
    prepared.apply(disable_observer)


def freeze_bn(prepared: nn.Module) -> None:
    """Freeze batch-norm statistics of fused Conv-BN QAT modules (use running stats from now on).

    Args:
        prepared: A module from :func:`prepare` with ``mode="qat"``.

    Example:
        >>> freeze_bn(prepare(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))))
    """
    prepared.apply(freeze_bn_stats)


def weighted_layer(module: nn.Module) -> nn.Module | None:
    """The Conv/Linear of a module (itself, or the first of a fused float ``nni`` sequence), or None.

    Example:
        >>> weighted_layer(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        Linear(in_features=2, out_features=2, bias=True)
    """
    layers = (nn.modules.conv._ConvNd, nn.Linear)
    if isinstance(module, layers):
        return module
    first = module[0] if isinstance(module, nn.Sequential) and len(module) else None
    return first if isinstance(first, layers) else None


def folded_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Detached ``(weight, bias)`` of a (QAT or float) weighted module, its ``bn`` folded in as QAT folds it.

    Example:
        >>> weight, bias = folded_weight_and_bias(nn.Linear(2, 3, bias=False))
        >>> tuple(weight.shape), bias
        ((3, 2), None)
    """
    layer = weighted_layer(module)
    layer = module if layer is None else layer
    weight, bias = layer.weight.detach(), None if getattr(layer, "bias", None) is None else layer.bias.detach()
    bn = getattr(module, "bn", None)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # _ConvBnNd's scale_factor
        weight = weight * factor.reshape([-1] + [1] * (weight.dim() - 1))
        bias = (torch.zeros_like(bn.running_mean) if bias is None else bias) - bn.running_mean
        bias = bias * factor + bn.bias.detach()
    return weight, bias


def frozen_copy(prepared: fx.GraphModule) -> fx.GraphModule:
    """A copy of a QAT-prepared module whose quantization parameters no longer move, in eval mode.

    Each weight fake-quantizer first observes its current (BN-folded) weight, as torch's conversion does,
    then every observer is disabled: the copy computes exactly the numerics the int8 models are built from,
    and running it changes no scale. For a calibrated (observer-only) module use
    :func:`~lightning_compress.quantization.qdq.qdq_network`.

    Args:
        prepared: A module from :func:`prepare` with ``mode="qat"``.

    Returns:
        The frozen copy, on CPU.

    Example:
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)))
        >>> frozen = frozen_copy(prepared)
        >>> frozen.training
        False
    """
    with quiet_torch_ao():
        model = copy.deepcopy(prepared).cpu().eval()
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "weight_fake_quant"):
                    module.weight_fake_quant(folded_weight_and_bias(module)[0])
        model.apply(disable_observer)
    return model


def weight_quantization_errors(prepared: nn.Module) -> dict[str, float]:
    """Relative error ``||fq(w) - w|| / ||w||`` of each fake-quantized weight at its current scale.

    For fused Conv-BN modules the weight that gets quantized is the BN-folded one, so the error is
    measured on it. Pure: observers are not updated. Layers whose observer has not run yet are left out.

    Args:
        prepared: A module from :func:`prepare` with ``mode="qat"``.

    Returns:
        ``{module name: relative error}``.

    Example:
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)))
        >>> _ = prepared(torch.randn(3, 4))
        >>> list(weight_quantization_errors(prepared))
        ['0']
    """
    errors = {}
    for name, module in prepared.named_modules():
        fq = getattr(module, "weight_fake_quant", None)
        if fq is None or fq.scale.numel() != module.weight.shape[0]:
            continue
        with torch.no_grad():
            weight = folded_weight_and_bias(module)[0]
            quantized = torch.fake_quantize_per_channel_affine(
                weight, fq.scale, fq.zero_point.to(torch.int32), fq.ch_axis, fq.quant_min, fq.quant_max
            )
            errors[name] = float((quantized - weight).norm() / weight.norm().clamp_min(1e-12))
    return errors


def activation_scales(prepared: fx.GraphModule) -> dict[str, float]:
    """Current scale of each activation fake-quantizer, named after the graph value it quantizes.

    Args:
        prepared: A module from :func:`prepare` with ``mode="qat"``.

    Returns:
        ``{graph value name (e.g. "x", "relu_1", "layer1_0_conv1"): scale}``.

    Example:
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)))
        >>> _ = prepared(torch.randn(3, 4))
        >>> sorted(activation_scales(prepared))
        ['_0', 'input_1']
    """
    scales = {}
    modules = dict(prepared.named_modules())
    for node in prepared.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, FakeQuantizeBase) and node.args and isinstance(node.args[0], fx.Node):
            scales[node.args[0].name] = float(module.scale.flatten()[0])
    return scales
