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

Numerics: weights int8 symmetric per-channel (zero-point 0, so pruned zeros stay exactly zero),
activations 8-bit per-tensor affine (``quint8``). On the x86 engines (``x86`` and ``onednn``) the
activation range is 0..127 (torch's ``reduce_range``): without VNNI (AVX2, AVX-512 before Cascade
Lake) both fbgemm and oneDNN multiply u8 x s8 with ``vpmaddubsw``, which sums pairs of products in
int16 and saturates for large activations (measured here on AVX2: a 16-term dot product of 255s and
127s comes out as 262136 instead of 518160 on both engines with the full range). The model may run
on a CPU other than the one that trained it, so the safe range is used on every x86 CPU (torch's own
``onednn`` default keeps the full range and warns on non-VNNI CPUs). ``qnnpack`` (ARM) uses the full
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
import io
import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import fx, nn

from lightning_compress.core.files import write_zip_deflated
from lightning_compress.core.layers import matches_any

ENGINES: tuple[str, ...] = ("x86", "onednn", "qnnpack")
"""CPU int8 engines: ``x86`` (fbgemm kernels; servers and desktops, best at small batches),
``onednn`` (oneDNN kernels on x86; best for batched throughput) and ``qnnpack`` (ARM, mobile).

Measured on a 2-core AVX2 CPU (no VNNI), 1 thread, as files written by :func:`save_quantized`
(``benchmarks/results/quantization.md``): int8 ResNet-20 is 4.3x faster than fp32 eager at batch 1
and 2.3x at batch 64 on ``x86``, 4.0x and 4.4x on ``onednn``; ResNet-56 4.3x / 2.4x and 3.8x / 4.1x."""

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
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization import (
        FakeQuantizeBase,
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
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"engine {engine!r} is not available in this torch build; available: "
            f"{[e for e in ENGINES if e in torch.backends.quantized.supported_engines]}"
        )
    return engine


def _qconfig(engine: str, qat: bool) -> QConfig:
    act_max = 255 if engine == "qnnpack" else 127  # see the module docstring: int16 pair sums on x86
    if qat:
        activation = FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=act_max, dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        )
        # averaging_constant=1: weights are known exactly at every step, so their range is the current
        # one (torch's default averages with 0.01 and clips weights that grew since: ~8% error early on)
        weight = FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0, quant_min=-127, quant_max=127,
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
        )
    else:
        activation = HistogramObserver.with_args(
            quant_min=0, quant_max=act_max, dtype=torch.quint8, qscheme=torch.per_tensor_affine
        )
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


class _PathTracer(fx.Tracer):
    """An FX tracer that remembers which module it was inside when tracing failed."""

    def __init__(self, leaves: Sequence[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)
        self.path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.path.pop()  # left on the stack when tracing raises: the innermost module at fault
        return out


def check_traceable(network: nn.Module, skip: Sequence[str] = (), prefix: str = "") -> None:
    """Symbolically trace ``network`` (cheap, no data) to fail before training if FX cannot.

    Args:
        network: The network to quantize.
        skip: Module names (relative to ``network``) kept as opaque fp32 leaves.
        prefix: How the caller names the network, for the message.

    Raises:
        ValueError: Naming the innermost module whose ``forward`` cannot be traced and the skip
            pattern that keeps it in fp32.

    Example:
        >>> check_traceable(nn.Sequential(nn.Linear(2, 2)))
    """
    tracer = _PathTracer(skip)
    try:
        tracer.trace(network)
    except Exception as err:  # FX raises TraceError, TypeError, AttributeError... depending on the code
        where = tracer.path[-1] if tracer.path and tracer.path[-1] else ""
        if where:
            hint = f"keep it in fp32 with skip=[{(prefix + where)!r}]"
        else:
            hint = "the failing code is in the network's own forward; skip its children or simplify that forward"
        raise ValueError(
            f"cannot trace module {(prefix + where) or prefix.rstrip('.') or type(network).__name__!r} for "
            f"quantization ({type(err).__name__}: {err}); {hint}"
        ) from err


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
    return defaults(engine).set_global(_qconfig(engine, qat=mode == "qat"))


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
        skip: Module names (relative to ``network``) kept in fp32 and not traced.

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
    with _routed_warnings():
        mapping = _qconfig_mapping(engine, mode)
        for name in skip:
            mapping.set_module_name(name, None)
        custom = PrepareCustomConfig().set_non_traceable_module_names(list(skip))
        prepare_fn = prepare_qat_fx if mode == "qat" else prepare_fx
        prepared = prepare_fn(network, mapping, (), prepare_custom_config=custom)
    if mode == "qat" and {id(p) for p in prepared.parameters()} != before:  # eval-mode prepare folds BN
        raise RuntimeError(
            "FX preparation no longer keeps the network's Parameter objects (torch "
            f"{torch.__version__}); optimizers and pruning masks would train stale tensors"
        )
    for module in prepared.modules():
        if isinstance(module, (ObserverBase, FakeQuantizeBase)):
            module.register_forward_pre_hook(_observe_in_float32)
    return prepared


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


def convert(prepared: nn.Module, engine: str = "x86") -> fx.GraphModule:
    """Convert a prepared module to a real int8 model for ``engine`` (CPU only), in eval mode.

    Sets ``torch.backends.quantized.engine`` (process-wide, as torch requires for int8 kernels).
    The module is converted on CPU; ``prepared`` itself is moved there.

    Args:
        prepared: A module from :func:`prepare` (calibrated or QAT-trained).
        engine: One of :data:`ENGINES`.

    Returns:
        The int8 ``GraphModule``.

    Raises:
        ValueError: If ``prepared`` was never prepared, or on an unknown engine.

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
    torch.backends.quantized.engine = engine
    with _routed_warnings():
        return convert_fx(prepared.cpu().eval())


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
