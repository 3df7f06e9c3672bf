"""Deployable artifacts, one module each, and the export that writes them all.

* :mod:`.packed` -- packed sparse weights (``weights.lcpk``);
* :mod:`.onnx` -- reading ONNX files back: their metadata, what a QDQ model quantizes. The fp32 ONNX bytes
  and :class:`OnnxRuntimeNetwork` come from :mod:`lightning_compress.core.onnx`, the int8 QDQ ONNX from
  :mod:`lightning_compress.quantization.qdq` (built from the learned quantization parameters);
* :mod:`lightning_compress.core.comparison` -- what "the artifact computes what the model computes" means,
  measured;
* :mod:`.artifacts` -- :func:`export_artifacts` (per-artifact status in ``manifest.json``) and
  :func:`load_artifact`.
* :mod:`.sample` -- the check images: a seeded sample in which every class keeps its share.
"""

from lightning_compress.core.comparison import Parity, parity
from lightning_compress.core.onnx import MissingExtraError, OnnxRuntimeNetwork, onnx_bytes
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
from lightning_compress.quantization.qdq import qdq_onnx_bytes

__all__ = [
    "ARTIFACTS", "CODECS", "FILES", "MANIFEST", "PACKED_SUFFIX", "VALUE_FORMATS", "Artifact", "ExportResult",
    "MissingExtraError", "OnnxRuntimeNetwork", "Parity", "build_network", "check_export_directory",
    "export_artifacts", "int8_from_qat", "int8_weight_quantization", "load_artifact", "onnx_bytes",
    "pack_state_dict", "parity", "qdq_onnx_bytes", "read_packed", "unpack_state_dict", "write_packed",
]
