"""Deployable artifacts, one module each, and the export that writes them all.

* :mod:`.packed` -- packed sparse weights (``weights.lcpk``);
* :mod:`.onnx` -- fp32 ONNX and the int8 QDQ ONNX (built by :mod:`.qdq` from the learned quantization
  parameters), run by onnxruntime;
* :mod:`.comparison` -- what "the artifact computes what the model computes" means, measured;
* :mod:`.artifacts` -- :func:`export_artifacts` (per-artifact status in ``manifest.json``) and
  :func:`load_artifact`.
"""

from lightning_compress.export.artifacts import (
    ARTIFACTS,
    FILES,
    MANIFEST,
    Artifact,
    ExportResult,
    build_network,
    check_export_directory,
    export_artifacts,
    int8_from_qat,
    load_artifact,
)
from lightning_compress.export.onnx import MissingExtraError, OnnxRuntimeNetwork, onnx_bytes, qdq_onnx_bytes
from lightning_compress.export.packed import (
    CODECS,
    PACKED_SUFFIX,
    VALUE_FORMATS,
    int8_weight_quantization,
    pack_state_dict,
    read_packed,
    unpack_state_dict,
    write_packed,
)
from lightning_compress.export.comparison import Parity, parity

__all__ = [
    "ARTIFACTS", "CODECS", "FILES", "MANIFEST", "PACKED_SUFFIX", "VALUE_FORMATS", "Artifact", "ExportResult",
    "MissingExtraError", "OnnxRuntimeNetwork", "Parity", "build_network", "check_export_directory",
    "export_artifacts", "int8_from_qat", "int8_weight_quantization", "load_artifact", "onnx_bytes",
    "pack_state_dict", "parity", "qdq_onnx_bytes", "read_packed", "unpack_state_dict", "write_packed",
]
