"""The one seam over the quantization library: prepare, calibrate, convert, save and load int8 models.

Everything that touches ``torch.ao.quantization`` lives here; the callbacks (:mod:`.qat`,
:mod:`.ptq`) only decide *when* to call it. Replacing the library means rewriting this file only.

**Why FX graph mode** (``prepare_qat_fx`` / ``prepare_fx`` / ``convert_fx``), measured with torch 2.14.1
and torchao 0.18 on the networks this project ships and the torchvision classifiers:

* FX graph mode prepares and converts the toy net, torchvision ``resnet18``, ``mobilenet_v2`` and
  ``vgg11_bn`` for both engines without edits to the model (it inserts the quant/dequant stubs
  itself, fuses Conv-BN(-ReLU) for QAT), and the converted model runs real int8 kernels (fbgemm /
  oneDNN on ``x86``, QNNPACK on ARM) in eager mode: 3.8x faster than fp32 on resnet18 at batch 64.
* torchao's PT2E flow (``prepare_qat_pt2e`` + ``X86InductorQuantizer``) fails on torchvision
  ``resnet18`` with "Input partition has more than one output node", and its converted model only
  runs faster after ``torch.compile`` with Inductor (a C++ toolchain at run time).
* FX keeps the network's ``Parameter`` objects when it swaps modules (``Conv2d`` + ``BatchNorm2d``
  -> ``ConvBn2d`` reuse the same weight tensors), so the optimizer built before preparation keeps
  training the real weights and pruning masks keyed by parameter name keep applying;
  :func:`prepare` checks this and fails loudly if a torch upgrade changes it.

``torch.ao.quantization`` is deprecated (its warning says "removed in 2.10", yet 2.14 still ships it).
Its deprecation warnings are filtered *only around the calls made from this module*
(:func:`_routed_warnings`), never process-wide; ``tests/quantization/test_backend.py`` pins the
whole flow so an upgrade that breaks or removes it fails the test suite, not a user's run.

**Deployment: the int8 QDQ ONNX model.** :func:`qdq_network` turns a QAT-trained or PTQ-calibrated network
into its QDQ form with the learned scales and zero-points (BN folded as QAT folds it, weights as int8
codes), and :mod:`lightning_compress.export.onnx` exports it through ``torch.export`` -- neither torch's
quantized tensors nor TorchScript, both deprecated, are on this path. With the ``onnxruntime`` and
``onnxruntime_symmetric`` engines, :func:`convert` puts that very model in place (run by onnxruntime), so
``trainer.test()`` measures the file a deployment ships; with their full 8-bit activation ranges the ONNX
model computes what the fake-quant model computed (``tests/quantization/test_deploy.py``: same top-1 on
every image, logits within a quantization step). ``onnxruntime_symmetric`` (int8 activations, zero-point 0)
is the QDQ form TensorRT reads.

**The default engine stays ``x86``**: it needs nothing beyond torch, while onnxruntime is the optional
``[export]`` extra. For deployment pick ``engine="onnxruntime"``; measured on a 2-core AMD EPYC
(AVX-512 VNNI) at load average 1, 1 thread, ResNet-20 batch 1 (``benchmarks/results/deploy_latency.md``): our
QDQ ONNX 0.22 ms, onnxruntime's own ``quantize_static`` 0.23 ms, torch int8 ``x86`` file 0.41 ms, onnxruntime
fp32 0.43 ms, torch fp32 eager 1.9 ms; MobileNetV2 batch 64: 27.0 / 28.2 / 39.3 / 84.4 / 475 ms. On
onnxruntime every convolution of these networks runs as one int8 kernel (``QLinearConv``, no float op
left between them; ReLU6 is quantized with its convolution, :func:`_backend_config`). With
``onnxruntime_symmetric`` onnxruntime keeps a convolution followed by ReLU/ReLU6 in float (a zero-point-0
int8 range has negative codes, so the clamp cannot go); TensorRT fuses it.

Numerics: weights int8 symmetric per-channel (zero-point 0, so pruned zeros stay exactly zero),
activations 8-bit per-tensor affine (``quint8``). On the x86 engines (``x86`` and ``onednn``) the
activation range is 0..127 (torch's ``reduce_range``): without VNNI (AVX2, AVX-512 before Cascade
Lake) both fbgemm and oneDNN multiply u8 x s8 with ``vpmaddubsw``, which sums pairs of products in
int16 and saturates for large activations (measured here on AVX2: a 16-term dot product of 255s and
127s comes out as 262136 instead of 518160 on both engines with the full range). The model may run
on a CPU other than the one that trained it, so the safe range is used on every x86 CPU (torch's own
``onednn`` default keeps the full range and warns on non-VNNI CPUs). Fake-quantization saturates every
activation at code 127; a converted model keeps only scale and zero-point, so :func:`convert` saturates
each activation again (:func:`clamp_to_reduced_range`): without it a value above the trained range takes
a code up to 255, and depthwise convolutions overflow their int16 pair sums even on VNNI CPUs (a
MobileNetV2 layer 36 quantization steps off without the clamps, 1 with). Measured cost at 1 thread on an
AVX-512 VNNI CPU: 11-15 % at batch 1, 3-6 % at batch 64 (ResNet-18, MobileNetV2, EfficientNet-B0 from
torchvision and timm, GhostNet; ``benchmarks/results/saturation_cost.md``). Weights are fake-quantized with the
observer's own scales, the ones conversion uses, so the int8 weights are the trained ones code for code.
FX tracing freezes ``self.training``: :func:`prepare` traces batch norms written outside torch (timm's
``BatchNormAct2d``) as torch's own, which fold into their convolution, and keeps other modules whose code
reads it (torchvision's ``StochasticDepth``) as fp32 leaves
(:mod:`~lightning_compress.quantization.tracing`). ``qnnpack`` (ARM) uses the full
0..255. Weights use -127..127, which QNNPACK requires and keeps the grid symmetric.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> prepared = prepare(net, "x86")
    >>> _ = prepared(torch.randn(2, 3, 8, 8))
    >>> int8 = convert(prepared)
    >>> type(int8.get_submodule("0")).__name__
    'ConvReLU2d'
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import fx, nn

from lightning_compress.core.files import write_zip_deflated
from lightning_compress.core.layers import matches_any
from lightning_compress.quantization.tracing import check_traceable, traceable_network

TORCH_ENGINES: tuple[str, ...] = ("x86", "onednn", "qnnpack")
"""torch int8 engines (quantized tensors, deprecated by torch): ``x86`` (fbgemm kernels), ``onednn``
(oneDNN kernels on x86) and ``qnnpack`` (ARM, mobile). Measured on a 2-core AMD EPYC (AVX-512 VNNI), 1
thread, as files written by :func:`save_quantized` (``benchmarks/results/quantization.md``): int8 ResNet-20
4.2x faster than fp32 eager at batch 1 and 6.7x at batch 64 on ``x86``, 4.3x / 6.0x on ``onednn`` (on an
AVX2 CPU without VNNI: 4.3x / 2.3x and 4.0x / 4.4x)."""
ONNX_ENGINES: tuple[str, ...] = ("onnxruntime", "onnxruntime_symmetric")
"""Engines whose int8 model is the deployable QDQ ONNX run by onnxruntime (needs the ``[export]`` extra).
``onnxruntime``: activations uint8 affine over the full 0..255 (onnxruntime's U8S8 kernels);
``onnxruntime_symmetric``: activations int8 symmetric (zero-point 0, -128..127), the QDQ form TensorRT's
explicit quantization reads (int8 only, zero-points 0, per-channel weights on axis 0). Both train with
exactly the numerics of the file (:func:`qdq_network`)."""
ENGINES: tuple[str, ...] = TORCH_ENGINES + ONNX_ENGINES
"""Every int8 engine (see :data:`TORCH_ENGINES` and :data:`ONNX_ENGINES`)."""

_TORCH_AO_WARNINGS = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation",
    r"`torch\.jit\.\w+` is deprecated",
    r"Default qconfig of oneDNN backend with reduce_range of false",  # ours reduces it (module docstring)
)
_ENGINE_FILE = "quantized_engine"


@contextlib.contextmanager
def _routed_warnings() -> Iterator[None]:
    """Silence torch.ao's own deprecation chatter for the duration of one backend call."""
    with warnings.catch_warnings():
        for message in _TORCH_AO_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


with _routed_warnings():
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.nn.qat as nnqat
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
    from torch.ao.quantization import (
        FakeQuantize,
        FakeQuantizeBase,
        FixedQParamsFakeQuantize,
        FixedQParamsObserver,
        FusedMovingAvgObsFakeQuantize,
        HistogramObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        ObserverBase,
        PerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
        default_dynamic_quant_observer,
        disable_observer,
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
    )
    from torch.ao.quantization.backend_config import (
        BackendConfig,
        BackendPatternConfig,
        DTypeConfig,
        ObservationType,
        get_native_backend_config,
    )
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx


def check_engine(engine: str) -> str:
    """Validate an engine name against :data:`ENGINES` and this torch build.

    Args:
        engine: One of :data:`ENGINES`.

    Returns:
        ``engine`` unchanged.

    Raises:
        ValueError: If the engine is unknown or this torch build lacks it.

    Example:
        >>> check_engine("x86")
        'x86'
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine in ONNX_ENGINES:
        from lightning_compress.export.onnx import require_onnx

        require_onnx(f"engine={engine!r}")
        return engine
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"engine {engine!r} is not available in this torch build; available: "
            f"{[e for e in ENGINES if e in torch.backends.quantized.supported_engines]}"
        )
    return engine


_REDUCED_RANGE_ENGINES = ("x86", "onednn")
"""Engines whose activations are trained on a reduced range, 0..127 (module docstring)."""
_REDUCED_QUANT_MAX = 127
"""Largest activation code of the x86 engines: no u8 x s8 pair of products overflows int16."""


def _reduced_range_max(scale: float, zero_point: int) -> float:
    """The largest value an activation quantized on the reduced range represents."""
    return (_REDUCED_QUANT_MAX - zero_point) * scale


def _activation_format(engine: str) -> dict:
    if engine == "onnxruntime_symmetric":
        return {"quant_min": -128, "quant_max": 127, "dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric}
    quant_max = _REDUCED_QUANT_MAX if engine in _REDUCED_RANGE_ENGINES else 255
    return {"quant_min": 0, "quant_max": quant_max, "dtype": torch.quint8, "qscheme": torch.per_tensor_affine}


_CLAMPS = (nn.ReLU6, nn.Hardtanh, nn.functional.relu6, nn.functional.hardtanh)
"""Bounded activations that the ONNX engines quantize together with the Conv/Linear before them."""
_CLAMPED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nnqat.Conv1d, nnqat.Conv2d, nnqat.Conv3d, nnqat.Linear,
                   nniqat.ConvBn1d, nniqat.ConvBn2d, nniqat.ConvBn3d, nniqat.LinearBn1d)
"""The layers (float after eval-mode fusion, or QAT) whose output such a clamp may follow."""


def _backend_config(engine: str) -> BackendConfig | None:
    """torch's native patterns, adapted to the QDQ ONNX form for :data:`ONNX_ENGINES` (None: the default).

    * ``onnxruntime_symmetric``: torch's x86 backend config accepts only ``quint8`` activations; FX would
      leave qint8-observed values unquantized. Every pattern that takes quint8 in and out (without fixed
      ranges) also takes qint8 here.
    * Both ONNX engines: a Conv/Linear followed by ReLU6 (or any hardtanh) is one quantized pattern, as
      Conv-ReLU is: no fake-quantizer between the layer and its clamp, one after the clamp. torch's own
      config quantizes the layer's output *before* ReLU6 (the clamp shares its observer), which spends
      half the 8-bit grid on negative values the clamp discards and, in ONNX, leaves
      ``DequantizeLinear -> Clip -> QuantizeLinear`` between every two convolutions, run in float by
      onnxruntime (MobileNetV2 at batch 64: 2x the latency of onnxruntime's own ``quantize_static``,
      ``benchmarks/results/deploy_latency.md``). With the clamp inside the pattern its output range lies
      within the clamp's, so :func:`qdq_network` drops it exactly and onnxruntime fuses
      ``DequantizeLinear -> Conv -> QuantizeLinear`` into one int8 kernel, as ``quantize_static`` does.
    """
    if engine not in ONNX_ENGINES:
        return None
    config = BackendConfig(engine)
    for pattern in get_native_backend_config().configs:
        if engine == "onnxruntime_symmetric":
            symmetric = [
                DTypeConfig(input_dtype=torch.qint8, output_dtype=torch.qint8, weight_dtype=dtype.weight_dtype,
                            bias_dtype=dtype.bias_dtype, is_dynamic=dtype.is_dynamic)
                for dtype in pattern.dtype_configs
                if dtype.input_dtype == torch.quint8 and dtype.output_dtype == torch.quint8
                and dtype.input_dtype_with_constraints.quant_min_lower_bound is None
            ]
            pattern = pattern.set_dtype_configs(list(pattern.dtype_configs) + symmetric)
        config.set_backend_pattern_config(pattern)
        if pattern.pattern in _CLAMPED_LAYERS:
            static = [dtype for dtype in pattern.dtype_configs if not dtype.is_dynamic]
            for clamp in _CLAMPS:
                config.set_backend_pattern_config(
                    BackendPatternConfig((pattern.pattern, clamp))
                    .set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
                    .set_dtype_configs(static)
                    .set_root_module(pattern.root_module)
                    .set_reference_quantized_module(pattern.reference_quantized_module)
                )
    return config


def _qconfig(engine: str, qat: bool) -> QConfig:
    if qat:
        # the fused kernel keeps non-negative ranges affine (zero-point -128 after a ReLU) even when asked
        # for symmetric; the plain FakeQuantize's observer keeps zero-point 0, which TensorRT requires
        fake_quantize = FakeQuantize if engine == "onnxruntime_symmetric" else FusedMovingAvgObsFakeQuantize
        activation = fake_quantize.with_args(observer=MovingAverageMinMaxObserver, **_activation_format(engine))
        # averaging_constant=1: weights are known exactly at every step, so their range is the current
        # one (torch's default averages with 0.01 and clips weights that grew since: ~8% error early on).
        # The plain FakeQuantize, not the fused kernel: its scale is the observer's calculate_qparams, the
        # one conversion quantizes with; the fused kernel rounds per-channel symmetric scales its own way
        # (up to 0.4 % apart, one weight code: the int8 model then computes something else)
        weight = FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0, quant_min=-127, quant_max=127,
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
        )
    else:
        activation = HistogramObserver.with_args(**_activation_format(engine))
        weight = PerChannelMinMaxObserver.with_args(
            quant_min=-127, quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        )
    return QConfig(activation=activation, weight=weight)


def resolve_skip(network: nn.Module, patterns: Sequence[str], prefix: str = "") -> list[str]:
    """Turn glob patterns into the names of the submodules kept in fp32 (and not traced).

    Args:
        network: The network about to be quantized.
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
    names = [name for name, _ in network.named_modules() if name]
    for pattern in patterns:
        if not any(matches_any(prefix + name, [pattern]) for name in names):
            shown = [prefix + n for n in names[:30]] + (["..."] if len(names) > 30 else [])
            raise ValueError(f"skip pattern {pattern!r} matches no module; modules are: {shown}")
    matched = [name for name in names if matches_any(prefix + name, patterns)]
    return [name for name in matched if not any(name.startswith(outer + ".") for outer in matched)]


MODES: tuple[str, ...] = ("qat", "static", "dynamic")
"""What :func:`prepare` inserts: fake-quantization for training, observers for calibration, or
dynamic int8 (``nn.Linear`` / RNN weights only, activations quantized on the fly, no calibration)."""


def _qconfig_mapping(engine: str, mode: str) -> QConfigMapping:
    if mode == "dynamic":
        weight = PerChannelMinMaxObserver.with_args(
            quant_min=-127, quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        )
        # global: only ops that have dynamic int8 kernels (Linear, RNNs) change; convolutions stay fp32
        return QConfigMapping().set_global(QConfig(activation=default_dynamic_quant_observer, weight=weight))
    # engine defaults first: they carry the fixed-range qconfigs of sigmoid/tanh/softmax...
    defaults = get_default_qat_qconfig_mapping if mode == "qat" else get_default_qconfig_mapping
    return defaults(engine if engine in TORCH_ENGINES else "x86").set_global(_qconfig(engine, qat=mode == "qat"))


def prepare(network: nn.Module, engine: str = "x86", mode: str = "qat", skip: Sequence[str] = ()) -> fx.GraphModule:
    """Insert fake-quantization (QAT) or observers (static / dynamic PTQ) into ``network``.

    ``network`` is put in train mode for ``"qat"`` (Conv-BN(-ReLU) become fused QAT modules that
    fold BN into the fake-quantized weight) and in eval mode otherwise (BN folded into the conv).
    For QAT the returned module shares its parameters with ``network`` (checked), so an optimizer
    built before keeps training them; deep-copy ``network`` first to leave it untouched.

    FX wants ``example_inputs``; torch 2.14 uses them only for standalone modules, which this backend
    does not configure, so none are needed here.

    Args:
        network: The fp32 network.
        engine: One of :data:`ENGINES`.
        mode: One of :data:`MODES`.
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
    check_engine(engine)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    check_traceable(network, skip)
    network.train(mode == "qat")
    before = {id(p) for p in network.parameters()}
    network, skip = traceable_network(network, skip)
    with _routed_warnings():
        mapping = _qconfig_mapping(engine, mode)
        for name in skip:
            mapping.set_module_name(name, None)
        custom = PrepareCustomConfig().set_non_traceable_module_names(list(skip))
        prepare_fn = prepare_qat_fx if mode == "qat" else prepare_fx
        prepared = prepare_fn(network, mapping, (), prepare_custom_config=custom, backend_config=_backend_config(engine))
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
    (timm's ``zero_init_last``, the default of its ResNets; torchvision's ``zero_init_residual=True``);
    after some fp32 training the scales have moved off zero.

    Args:
        prepared: A module from :func:`prepare` with ``mode="qat"``.

    Raises:
        ValueError: Naming the layers and the remedies.
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


def calibrate(prepared: nn.Module, batches: Iterable[tuple]) -> int:
    """Run ``prepared`` (eval mode, no grad) on batches of positional inputs to fill its observers.

    Args:
        prepared: A module from :func:`prepare` with ``mode="static"``.
        batches: Iterable of input tuples, e.g. ``[(images,), ...]``.

    Returns:
        The number of batches seen.

    Example:
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)), mode="static")
        >>> calibrate(prepared, [(torch.randn(3, 4),)])
        1
    """
    seen = 0
    prepared.eval()
    with torch.no_grad():
        for inputs in batches:
            prepared(*inputs)
            seen += 1
    return seen


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


def convert(prepared: nn.Module, engine: str = "x86", example_inputs: tuple | None = None) -> nn.Module:
    """Convert a prepared module to a real int8 model for ``engine`` (CPU only), in eval mode.

    For :data:`TORCH_ENGINES` this is torch's FX conversion to quantized modules, and sets
    ``torch.backends.quantized.engine`` (process-wide, as torch requires for int8 kernels). For
    :data:`ONNX_ENGINES` the result is the QDQ ONNX model built from the learned quantization parameters
    (:func:`qdq_network`), run by onnxruntime inside an ``nn.Module``
    (:class:`~lightning_compress.export.onnx.OnnxRuntimeNetwork`): the file a deployment ships.
    ``prepared`` itself is moved to CPU and left prepared.

    Args:
        prepared: A module from :func:`prepare` (calibrated or QAT-trained).
        engine: One of :data:`ENGINES`.
        example_inputs: Positional inputs to export with; required for :data:`ONNX_ENGINES`.

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
    check_engine(engine)
    if not is_prepared(prepared) or not isinstance(prepared, fx.GraphModule):
        raise ValueError(
            "convert needs a prepared model (from prepare / QuantizationAwareTraining / calibration); "
            f"{type(prepared).__name__} was never prepared"
        )
    if engine in ONNX_ENGINES:
        if example_inputs is None:
            raise ValueError(f"engine {engine!r} exports the network to ONNX: pass example_inputs")
        from lightning_compress.export.onnx import OnnxRuntimeNetwork, qdq_onnx_bytes

        return OnnxRuntimeNetwork(qdq_onnx_bytes(qdq_network(prepared.cpu()), tuple(example_inputs)))
    torch.backends.quantized.engine = engine
    # the fixed full-range qparams of sigmoid, tanh, softmax: read before convert_fx consumes the quantizers
    full_range = {(float(m.scale), int(m.zero_point)) for m in prepared.modules()
                  if isinstance(m, (FixedQParamsFakeQuantize, FixedQParamsObserver))}
    with _routed_warnings():
        int8 = _keepdim_means(convert_fx(prepared.cpu().eval()))
    return _clamped_activations(int8, full_range) if engine in _REDUCED_RANGE_ENGINES else int8


class ConversionError(RuntimeError):
    """The converted int8 model cannot run, or computes something else than the fake-quant model."""


def check_conversion(reference: nn.Module, int8: nn.Module, inputs: tuple, prefix: str = "",
                     min_agreement: float = 0.9, tolerance: float = 0.05) -> None:
    """Run the int8 model on one batch and compare it with the fake-quant model it was converted from.

    The int8 model rounds a few values one step differently from the fake-quant model (integer
    averages, requantized products). A well-conditioned network shrugs that off, so its top-1 must agree
    on ``min_agreement`` of the batch. A network that amplifies any perturbation (a few steps of random
    data leave batch-norm running statistics far from the batch's, and eval-mode activations saturate)
    changes its own answers as much when its inputs move by one 8-bit step: then the int8 model passes
    when it agrees with the fake-quant model at least as well as the fake-quant model agrees with itself
    on those nudged inputs.

    Args:
        reference: The fake-quant model (:func:`frozen_copy` of a QAT model, :func:`qdq_network` of a
            calibrated one).
        int8: The converted model.
        inputs: One batch of positional inputs (CPU), e.g. a calibration batch.
        prefix: How the caller names the network (``"model."``), for the message.
        min_agreement: Near-tie-tolerant top-1 agreement below which the conversion counts as wrong.
        tolerance: Near-tie tolerance (see :func:`lightning_compress.export.comparison.parity`).

    Raises:
        ConversionError: Naming the module that fails to run and the ``skip`` pattern that keeps it in
            fp32, or saying how far the outputs are apart.

    Example:
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)), mode="static")
        >>> batch = (torch.randn(8, 4),)
        >>> _ = calibrate(prepared, [batch])
        >>> check_conversion(qdq_network(prepared, saturate_at_trained_range=True), convert(prepared), batch)
    """
    from lightning_compress.export.comparison import parity

    with torch.no_grad(), _routed_warnings():
        try:
            logits = _locating(int8)(*inputs)
        except _ModuleFailed as failed:
            name = prefix + failed.module
            raise ConversionError(
                f"the int8 model fails on a calibration batch in module {name!r} ({failed.__cause__}); keep it in "
                f"fp32 with skip=[{name!r}]"
            ) from failed.__cause__
        except Exception as err:  # onnxruntime and the int8 kernels raise their own types
            raise ConversionError(
                f"the int8 model fails on a calibration batch ({type(err).__name__}: {err}); keep the failing "
                f"module in fp32 with skip=['{prefix}<module>']"
            ) from err
        expected = reference.eval()(*inputs)
    if not isinstance(logits, torch.Tensor) or logits.shape != expected.shape:
        return  # not a logits tensor: only "it runs" is checked
    flat = (expected.reshape(len(expected), -1), logits.reshape(len(logits), -1).float())
    result = parity(*flat, tolerance=tolerance) if flat[0].shape[1] > 1 else None
    if result is not None and result.agreement < min_agreement:
        # as unstable as the network itself? compare with the fake-quant model on inputs one 8-bit step off
        with torch.no_grad(), _routed_warnings():
            nudged = reference(*(_nudged(x) for x in inputs))
        floor = parity(flat[0], nudged.reshape(len(nudged), -1), tolerance=tolerance).agreement
        if result.agreement >= floor:
            result = None
    if not torch.isfinite(flat[1]).all() or (result is not None and result.agreement < min_agreement):
        raise ConversionError(
            f"the int8 model computes something else than the fake-quant model on a calibration batch "
            f"(agreement {result.agreement if result else float('nan'):.1%}, max logit error "
            f"{result.max_logit_error if result else float('nan'):.3g} of the logit range); keep the layers "
            f"that differ in fp32 with skip=['{prefix}<module>']"
        )


def _nudged(x):
    """``x`` moved by up to one 8-bit step of its range, per element (a seeded draw); non-tensors as they are."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return x + noise.to(x.dtype) * (x.max() - x.min()) / 255


class _ModuleFailed(Exception):
    def __init__(self, module: str) -> None:
        super().__init__(module)
        self.module = module


def _locating(model: nn.Module):
    """``model`` as a callable that names the submodule at fault when an FX graph module raises."""
    if not isinstance(model, fx.GraphModule):
        return model

    class Locating(fx.Interpreter):
        def run_node(self, node: fx.Node):
            try:
                return super().run_node(node)
            except Exception as err:  # whatever the kernel raised
                if node.op != "call_module":
                    raise
                raise _ModuleFailed(str(node.target)) from err

    return lambda *args: Locating(model).run(*args)


_RELU_MODULES = (nni.ConvReLU1d, nni.ConvReLU2d, nni.ConvReLU3d, nni.LinearReLU, nniqat.ConvBnReLU1d,
                 nniqat.ConvBnReLU2d, nniqat.ConvBnReLU3d, nniqat.ConvReLU1d, nniqat.ConvReLU2d, nniqat.ConvReLU3d,
                 nniqat.LinearReLU)


def frozen_copy(prepared: fx.GraphModule) -> fx.GraphModule:
    """A copy of a QAT-prepared module whose quantization parameters no longer move, in eval mode.

    Each weight fake-quantizer first observes its current (BN-folded) weight, as torch's conversion does,
    then every observer is disabled: the copy computes exactly the fake-quant numerics that
    :func:`qdq_network` and the converted models are built from, and running it (a parity check, say)
    changes no scale. For a statically prepared (observer-only) module use :func:`qdq_network`.

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
    with _routed_warnings():
        model = copy.deepcopy(prepared).cpu().eval()
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "weight_fake_quant"):
                    module.weight_fake_quant(_folded(module)[0])
        model.apply(disable_observer)
    return model


def _weighted_layer(module: nn.Module) -> nn.Module | None:
    """The Conv/Linear of a module (itself, or the first of a fused float ``nni`` sequence), or None."""
    layers = (nn.modules.conv._ConvNd, nn.Linear)
    if isinstance(module, layers):
        return module
    first = module[0] if isinstance(module, nn.Sequential) and len(module) else None
    return first if isinstance(first, layers) else None


def _folded(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of a (QAT or float) weighted module with its BatchNorm folded in, as QAT folds it."""
    conv = _weighted_layer(module)
    weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    bn = getattr(module, "bn", None)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # _ConvBnNd's scale_factor
        weight = weight * factor.reshape([-1] + [1] * (weight.dim() - 1))
        bias = (torch.zeros_like(bn.running_mean) if bias is None else bias) - bn.running_mean
        bias = bias * factor + bn.bias.detach()
    return weight, bias


def _activation_qdq(module: nn.Module) -> nn.Module | None:
    """The QDQ replacement of an activation observer / fake-quantizer (None: the value stays float)."""
    from lightning_compress.export.qdq import QuantizeDequantize

    dtype = {torch.quint8: torch.uint8, torch.qint8: torch.int8}.get(getattr(module, "dtype", None))
    if dtype is None:
        return None
    if isinstance(module, FakeQuantizeBase):
        scale, zero_point = module.scale, module.zero_point
    else:
        scale, zero_point = module.calculate_qparams()
    return QuantizeDequantize(float(scale.flatten()[0]), int(zero_point.flatten()[0]), dtype)


def _weighted_qdq(module: nn.Module) -> nn.Module | None:
    """The QDQ replacement of a QAT or calibrated Conv/Linear (None: not quantized, stays as it is)."""
    from lightning_compress.export.qdq import DequantizedWeight, QDQConv, QDQLinear, quantize_weight

    fake_quant = getattr(module, "weight_fake_quant", None)
    qconfig = getattr(module, "qconfig", None)
    conv = _weighted_layer(module)
    if (fake_quant is None and qconfig is None) or conv is None:
        return None
    weight, bias = _folded(module)
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


def qdq_network(prepared: fx.GraphModule, saturate_at_trained_range: bool = False) -> fx.GraphModule:
    """The QDQ form of a QAT-trained or PTQ-calibrated network, with its learned quantization parameters.

    Every activation fake-quantizer / observer becomes a
    :class:`~lightning_compress.export.qdq.QuantizeDequantize` with its scale and zero-point; every
    quantized Conv/Linear (BN folded in, as QAT folds it) becomes a convolution/linear over int8 weight
    codes computed with its weight fake-quantizer's per-channel scales. Modules kept in fp32 (``skip``)
    stay as they are. The result is a plain fp32 network that exports to a QDQ ONNX model
    (:func:`lightning_compress.export.onnx.qdq_onnx_bytes`) computing exactly what it computes.

    A clamp (ReLU6, hardtanh, a fused ReLU) whose only user is a quantization that already saturates at
    the clamp's bounds is removed: quantizing is monotonic, so ``Q(clamp(x)) == Q(x)`` for every ``x``
    (checked with ``Q``'s own arithmetic, per clamp). The ONNX model then has ``Conv -> QuantizeLinear``
    with nothing in between, which onnxruntime fuses into one int8 kernel. Learned ranges after ReLU6
    (zero-point at the bottom of the uint8 grid, maximum at most 6) always qualify; int8 symmetric
    ranges (``onnxruntime_symmetric``) keep negative codes, so their clamps stay.

    Numerics versus the QAT model: identical weights; activations identical for :data:`ONNX_ENGINES` and
    ``qnnpack``, whose ranges are a full 8-bit type. The x86 engines train activations on 0..127, which
    ONNX cannot express: their QDQ form keeps the scale and zero-point and saturates at 255 instead of
    127, so values above the trained range are not clipped (measured by the export's parity check).
    With ``saturate_at_trained_range`` each such quantization is preceded by a clamp at code 127, as the
    fake-quant and the torch int8 models compute: the reference a calibrated x86 model is checked
    against. The export leaves it off: onnxruntime would run each clamp in float, between int8 kernels.

    Args:
        prepared: A module from :func:`prepare` (``"qat"`` or calibrated ``"static"``); left unchanged.
        saturate_at_trained_range: Clamp activations quantized on 0..127 at code 127.

    Returns:
        The QDQ-form network (CPU, eval mode).

    Example:
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)), mode="static")
        >>> _ = calibrate(prepared, [(torch.randn(8, 4),)])
        >>> sorted({type(m).__name__ for m in qdq_network(prepared).modules()} - {"GraphModule"})
        ['DequantizedWeight', 'QDQLinear', 'QuantizeDequantize']
    """
    model = frozen_copy(prepared)
    replaced: dict[str, nn.Module | None] = {}
    reduced: set[str] = set()
    for node in list(model.graph.nodes):
        if node.op != "call_module":
            continue
        if node.target not in replaced:
            module = model.get_submodule(node.target)
            if isinstance(module, (ObserverBase, FakeQuantizeBase)):
                replaced[node.target] = _activation_qdq(module)
                if (saturate_at_trained_range and module.dtype == torch.quint8
                        and module.quant_max == _REDUCED_QUANT_MAX):
                    reduced.add(node.target)
            else:
                replaced[node.target] = _weighted_qdq(module) or module
                if replaced[node.target] is module:
                    continue
            if replaced[node.target] is not None:
                model.set_submodule(node.target, replaced[node.target])
        if replaced[node.target] is None:  # a float value: the observer disappears
            node.replace_all_uses_with(node.args[0])
            model.graph.erase_node(node)
        elif node.target in reduced:
            qdq = replaced[node.target]
            bound = _reduced_range_max(float(qdq.scale), int(qdq.zero_point))
            with model.graph.inserting_before(node):
                node.args = (model.graph.call_function(torch.clamp, (node.args[0],), {"max": bound}),)
    _drop_saturated_clamps(model)
    model.graph.lint()
    model.recompile()
    model.delete_all_unused_submodules()
    return model.eval()


def _clamp_bounds(model: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """``(low, high)`` of a clamping node (ReLU6/hardtanh module or function, a QDQ layer's ReLU), else None."""
    from lightning_compress.export.qdq import QDQConv, QDQLinear

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
    from lightning_compress.export.qdq import QuantizeDequantize

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


def clamp_to_reduced_range(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its codes above 127 saturated, if it is a ``quint8`` tensor (else ``x`` itself).

    An int8 model keeps only each activation's scale and zero-point, so a value above the range it was
    trained on takes a code up to 255, where fake-quantization saturated at 127. On x86 a Conv/Linear
    multiplies u8 x s8 pairs summed in int16, which overflow for such codes: measured here (AVX-512 VNNI),
    a MobileNetV2 layer came out 36 quantization steps wrong (``benchmarks/results/saturation_cost.md``).
    :func:`convert` puts this clamp on every activation of the x86 engines' int8 models, as
    fake-quantization saturates each one, so the int8 model computes what was trained.

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
    return torch.clamp(x, max=_reduced_range_max(x.q_scale(), x.q_zero_point()))


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

    Args:
        int8: A model from ``convert_fx``; rewritten in place.

    Returns:
        ``int8``.
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
            weight = module.weight
            bn = getattr(module, "bn", None)
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                weight = weight * factor.reshape([-1] + [1] * (weight.dim() - 1))
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


def save_quantized(
    model: nn.Module, path: str | os.PathLike, example_inputs: tuple, engine: str = "x86"
) -> Path:
    """Write an int8 model as TorchScript, atomically (temp file + rename), recording its engine.

    TorchScript round-trips the packed int8 weights exactly; ``torch.export`` does not serialize
    the quantized modules' packed parameters in torch 2.14. The model is *traced* (FX already made its
    graph straight-line; scripting fails on FX code generated from annotated ``forward`` methods) and
    *frozen* (weights inlined as constants, submodules dropped; numerics untouched): the file is about
    20 % smaller than the traced module's, and running it skips eager mode's per-module Python calls,
    which at batch 1 cost as much as the int8 kernels themselves (``benchmarks/results/quantization.md``).

    The archive's records are *deflated* (``torch.jit.save`` stores them uncompressed and 64-byte
    aligned); plain ``torch.jit.load`` and LibTorch read it as is. For ResNet-20 the file as
    ``torch.jit.save`` writes it is 16 % larger than the int8 weights (per-channel float64 scales and
    int64 zero-points, per-record headers and padding, debug info); deflated, 2 %: 0.246 of the fp32
    ``state_dict`` file for ResNet-20 trained 10 epochs
    (``benchmarks/results/quantization_accuracy_resnet20.md``).

    Args:
        model: An int8 model from :func:`convert`.
        path: Destination file (``.pt``).
        example_inputs: Positional inputs to trace with, e.g. ``(torch.randn(1, 3, 32, 32),)``.
        engine: The engine it was converted for (restored by :func:`load_quantized`).

    Returns:
        The written path.

    Example:
        >>> # save_quantized(int8_model, "model_int8.pt", (torch.randn(1, 3, 32, 32),))
    """
    check_engine(engine)
    path = Path(path)
    with _routed_warnings():
        with torch.no_grad():
            traced = torch.jit.trace(model.cpu().eval(), tuple(example_inputs))
            scripted = torch.jit.freeze(traced, optimize_numerics=False)
    archive = io.BytesIO()
    with _routed_warnings():
        torch.jit.save(scripted, archive, _extra_files={_ENGINE_FILE: engine})
    write_zip_deflated(archive.getvalue(), path)
    return path


def load_quantized(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load an int8 model written by :func:`save_quantized`, setting its engine first.

    Args:
        path: The file.

    Returns:
        The TorchScript module (CPU, eval mode).

    Raises:
        ValueError: If the file was not written by :func:`save_quantized`.

    Example:
        >>> # model = load_quantized("model_int8.pt"); model(images)
    """
    with zipfile.ZipFile(path) as archive:
        entry = next((n for n in archive.namelist() if n.endswith(f"/extra/{_ENGINE_FILE}")), None)
        if entry is None:
            raise ValueError(f"{path} is not an int8 model written by save_quantized (no engine record)")
        engine = archive.read(entry).decode()
    torch.backends.quantized.engine = check_engine(engine)
    with _routed_warnings():
        return torch.jit.load(str(path), map_location="cpu").eval()
