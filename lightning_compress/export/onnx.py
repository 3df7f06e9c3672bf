"""ONNX files as the export writes them: the metadata they carry, what a QDQ model quantizes.

The bytes themselves come from :func:`lightning_compress.core.onnx.onnx_bytes` (fp32) and
:func:`lightning_compress.quantization.qdq.qdq_onnx_bytes` (int8 QDQ, from the learned quantization
parameters); :class:`~lightning_compress.core.onnx.OnnxRuntimeNetwork` runs them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lightning_compress.core.onnx import METADATA_KEY, require_onnx


def quantization_summary(model: bytes | str | os.PathLike[str]) -> dict[str, Any]:
    """What a QDQ ONNX model quantizes and how: op types, zero-point dtypes and values, weight axes.

    Args:
        model: The ONNX model (bytes or file).

    Returns:
        ``{"ops": set of op types, "activation_zero_points": [(dtype name, value), ...],
        "weights": [(dtype name, axis, all zero-points 0), ...]}``; activations are quantized by
        ``QuantizeLinear``, weights are int8 initializers read by ``DequantizeLinear``.

    Example:
        >>> import torch
        >>> from lightning_compress.core.onnx import onnx_bytes
        >>> quantization_summary(onnx_bytes(torch.nn.Linear(4, 2), torch.randn(1, 4)))["weights"]
        []
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    graph = proto.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    summary: dict[str, Any] = {"ops": {node.op_type for node in graph.node}, "activation_zero_points": [],
                               "weights": []}
    for node in graph.node:
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 else None
        if node.op_type == "QuantizeLinear" and zero_point is not None:
            summary["activation_zero_points"].append((str(zero_point.dtype), int(zero_point.reshape(-1)[0])))
        if node.op_type == "DequantizeLinear" and node.input[0] in constants and zero_point is not None:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            summary["weights"].append((str(constants[node.input[0]].dtype), axis, bool((zero_point == 0).all())))
    return summary


def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata that :func:`~lightning_compress.core.onnx.onnx_bytes` stored in an ONNX file.

    Args:
        path: The ONNX file.

    Returns:
        The metadata.

    Raises:
        ValueError: If the file is not a readable ONNX model or has no such metadata.

    Example:
        >>> # onnx_metadata("export/model_int8.onnx")["classes"]
    """
    require_onnx("reading an ONNX model")
    import onnx

    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as err:  # onnx raises DecodeError and others on damaged files
        raise ValueError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err})") from err
    if METADATA_KEY not in props:
        raise ValueError(f"{path} has no '{METADATA_KEY}' metadata; expected an ONNX model written by "
                         "`lightning-compress export`")
    return json.loads(props[METADATA_KEY])
