"""Quantization: QAT and post-training int8 as Lightning callbacks.

The callbacks (:mod:`.qat`, :mod:`.ptq`) decide *when*; the modules below decide *how*, one job each:
:mod:`.engines` (the engine table), :mod:`.qconfigs` (what each engine trains with), :mod:`.prepare`
(fake-quantization and observers), :mod:`.convert` (the int8 model), :mod:`.qdq` (the QDQ form and its
ONNX), :mod:`.check` (the int8 model checked on a real batch), :mod:`.files` (TorchScript int8 files),
:mod:`.tracing` (user networks -> FX graphs).
"""

from lightning_compress.quantization.engines import ENGINES
from lightning_compress.quantization.files import load_quantized, save_quantized
from lightning_compress.quantization.ptq import PostTrainingQuantization, quantize_dynamic, quantize_static
from lightning_compress.quantization.qat import QuantizationAwareTraining

__all__ = [
    "ENGINES",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "load_quantized",
    "quantize_dynamic",
    "quantize_static",
    "save_quantized",
]
