"""Quantization: QAT and post-training int8 as Lightning callbacks over one backend seam."""

from lightning_compress.quantization.backend import ENGINES, load_quantized, save_quantized
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
