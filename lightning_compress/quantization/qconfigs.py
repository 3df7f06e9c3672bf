"""What each engine trains with: torch.ao observers, fake-quantizers and the patterns quantized together.

Weights are int8 symmetric per channel on -127..127 (zero-point 0, so pruned zeros stay exactly zero;
QNNPACK requires the symmetric grid), on -63..63 for ``onnxruntime_7bit``. Activations are 8-bit per tensor:
``quint8`` affine on 0..255, on 0..127 for the reduced-range engines, ``qint8`` symmetric for
``onnxruntime_symmetric`` (``docs/quantization-design.md`` says why).

Example:
    >>> from lightning_compress.quantization.engines import ENGINE_TABLE
    >>> qconfig_mapping(ENGINE_TABLE["x86"], "qat").global_qconfig.activation.p.keywords["quant_max"]
    127
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.quantization.deprecations import quiet_torch_ao
from lightning_compress.quantization.engines import REDUCED_QUANT_MAX, Engine, KernelFamily

with quiet_torch_ao():
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.nn.qat as nnqat
    from torch.ao.quantization import (
        FakeQuantize,
        FusedMovingAvgObsFakeQuantize,
        HistogramObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        PerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
        default_dynamic_quant_observer,
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

MODES: tuple[str, ...] = ("qat", "static", "dynamic")
"""What preparation inserts: fake-quantization for training, observers for calibration, or dynamic int8
(``nn.Linear`` / RNN weights only, activations quantized on the fly, no calibration)."""

_CLAMPS = (nn.ReLU6, nn.Hardtanh, nn.functional.relu6, nn.functional.hardtanh)
"""Bounded activations that the ONNX engines quantize together with the Conv/Linear before them."""
_CLAMPED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nnqat.Conv1d, nnqat.Conv2d, nnqat.Conv3d, nnqat.Linear,
                   nniqat.ConvBn1d, nniqat.ConvBn2d, nniqat.ConvBn3d, nniqat.LinearBn1d)
"""The layers (float after eval-mode fusion, or QAT) whose output such a clamp may follow."""


def _activation_format(engine: Engine) -> dict:
    if engine.symmetric_activations:
        return {"quant_min": -128, "quant_max": 127, "dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric}
    quant_max = REDUCED_QUANT_MAX if engine.reduced_range else 255
    return {"quant_min": 0, "quant_max": quant_max, "dtype": torch.quint8, "qscheme": torch.per_tensor_affine}


def _weight_format(engine: Engine) -> dict:
    return {"quant_min": -engine.weight_quant_max, "quant_max": engine.weight_quant_max, "dtype": torch.qint8,
            "qscheme": torch.per_channel_symmetric}


def backend_config(engine: Engine) -> BackendConfig | None:
    """torch's native patterns, adapted to the QDQ ONNX form for the ONNX engines (None: torch's default).

    * Symmetric activations: torch's x86 backend config accepts only ``quint8`` activations, and FX would
      leave qint8-observed values unquantized. Every pattern that takes quint8 in and out (without fixed
      ranges) also takes qint8 here.
    * Both ONNX engines: a Conv/Linear followed by ReLU6 (or any hardtanh) is one quantized pattern, as
      Conv-ReLU is. torch's own config quantizes the layer's output *before* ReLU6, which wastes half the
      8-bit grid and leaves a float ``Clip`` between every two int8 convolutions in ONNX; with the clamp
      inside the pattern :func:`~lightning_compress.quantization.qdq.qdq_network` drops it exactly and
      onnxruntime fuses each convolution into one int8 kernel (``benchmarks/results/deploy_latency.md``).

    Args:
        engine: The engine.

    Returns:
        The backend config, or None for torch's engines.

    Example:
        >>> from lightning_compress.quantization.engines import ENGINE_TABLE
        >>> backend_config(ENGINE_TABLE["x86"]) is None
        True
    """
    if engine.family is not KernelFamily.QDQ_ONNX:
        return None
    config = BackendConfig(engine.name)
    for pattern in get_native_backend_config().configs:
        if engine.symmetric_activations:
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


def _qconfig(engine: Engine, qat: bool) -> QConfig:
    if qat:
        # the fused kernel keeps non-negative ranges affine (zero-point -128 after a ReLU) even when asked
        # for symmetric; the plain FakeQuantize's observer keeps zero-point 0, which TensorRT requires
        fake_quantize = FakeQuantize if engine.symmetric_activations else FusedMovingAvgObsFakeQuantize
        activation = fake_quantize.with_args(observer=MovingAverageMinMaxObserver, **_activation_format(engine))
        # averaging_constant=1: weights are known exactly at every step, so their range is the current
        # one (torch's default averages with 0.01 and clips weights that grew since: ~8% error early on).
        # The plain FakeQuantize, not the fused kernel: its scale is the observer's calculate_qparams, the
        # one conversion quantizes with; the fused kernel rounds per-channel symmetric scales its own way
        # (up to 0.4 % apart, one weight code: the int8 model then computes something else)
        weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0,
                                        **_weight_format(engine))
    else:
        activation = HistogramObserver.with_args(**_activation_format(engine))
        weight = PerChannelMinMaxObserver.with_args(**_weight_format(engine))
    return QConfig(activation=activation, weight=weight)


def qconfig_mapping(engine: Engine, mode: str) -> QConfigMapping:
    """The qconfigs of every op for ``engine`` in ``mode``.

    Args:
        engine: The engine.
        mode: One of :data:`MODES`.

    Returns:
        torch's defaults for the engine (fixed ranges of sigmoid, tanh, softmax...) with this package's
        weight and activation formats as the global qconfig; for ``"dynamic"``, dynamic int8 everywhere.
    """
    if mode == "dynamic":
        weight = PerChannelMinMaxObserver.with_args(**_weight_format(engine))
        # global: only ops that have dynamic int8 kernels (Linear, RNNs) change; convolutions stay fp32
        return QConfigMapping().set_global(QConfig(activation=default_dynamic_quant_observer, weight=weight))
    # engine defaults first: they carry the fixed-range qconfigs of sigmoid/tanh/softmax...
    defaults = get_default_qat_qconfig_mapping if mode == "qat" else get_default_qconfig_mapping
    torch_engine = engine.name if engine.family is KernelFamily.TORCH_INT8 else "x86"
    return defaults(torch_engine).set_global(_qconfig(engine, qat=mode == "qat"))
