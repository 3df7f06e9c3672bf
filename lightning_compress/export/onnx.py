"""ONNX models: the fp32 network and the int8 QDQ network, exported through ``torch.export``, run by onnxruntime.

Both go through torch's ``torch.export``-based exporter (``dynamo=True``): no TorchScript, no quantized
tensors. The int8 model is the QDQ form of the QAT/PTQ network
(:func:`lightning_compress.quantization.backend.qdq_network`): its two custom ops become
``QuantizeLinear``/``DequantizeLinear`` (opset 18), weights are stored as ``int8`` initializers, and
onnxruntime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into int8 kernels.
:class:`OnnxRuntimeNetwork` wraps an onnxruntime session as an ``nn.Module`` so that ``trainer.test()``
runs the very file a deployment ships.

Example:
    >>> from torch import nn
    >>> net = OnnxRuntimeNetwork(onnx_bytes(nn.Linear(4, 2), torch.randn(1, 4), {}))
    >>> net(torch.randn(3, 4)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

OPSET = 18
"""ONNX opset of every exported model (per-axis DequantizeLinear needs >= 13)."""
METADATA_KEY = "lightning_compress"
"""Metadata-props key holding the JSON metadata (classes, normalization, model description)."""
EXPORT_EXTRA = "pip install 'lightning-compress[export]'"


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the pip command that installs it."""


def require_onnx(purpose: str) -> None:
    """Fail with one line naming the pip command when onnx, onnxruntime or onnxscript is missing.

    Args:
        purpose: What needs them, for the message (e.g. ``"export"``).

    Raises:
        MissingExtraError: If one of them cannot be imported.

    Example:
        >>> require_onnx("export")
    """
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(module)
        except ImportError as err:
            raise MissingExtraError(f"{purpose} needs the '{module}' package, which is not installed: "
                                    f"{EXPORT_EXTRA}") from err


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and warnings (its errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _translations() -> dict:
    from onnxscript import opset18 as op

    from lightning_compress.export import qdq  # noqa: F401  (registers the two ops)

    def quantize_dequantize(x, scale, zero_point):
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def dequantize(q, scale, zero_point, axis: int):
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return {torch.ops.lightning_compress.quantize_dequantize.default: quantize_dequantize,
            torch.ops.lightning_compress.dequantize.default: dequantize}


def _export(network: nn.Module, example: tuple, metadata: Mapping[str, Any] | None) -> bytes:
    require_onnx("ONNX export")
    network = network.eval()
    batch = torch.export.Dim("batch", min=1)
    dynamic = ({0: batch},) + tuple(None for _ in example[1:])
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(network, example, dynamo=True, opset_version=OPSET,
                                        input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=dynamic, custom_translation_table=_translations(),
                                        optimize=True, verify=False)
    except Exception as err:  # the exporter raises many types for unsupported code
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(f"the ONNX exporter cannot export this network: {type(err).__name__}: {first}") from err
    model = program.model_proto
    for node in model.graph.node:  # stack traces and source locations: a third of a small model's file
        del node.metadata_props[:]
        node.doc_string = ""
    if metadata is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(dict(metadata))
    return model.SerializeToString()


def onnx_bytes(network: nn.Module, example: torch.Tensor, metadata: Mapping[str, Any] | None = None) -> bytes:
    """Export an fp32 network to ONNX (dynamic batch size), with ``metadata`` in its metadata props.

    Args:
        network: The fp32 network.
        example: An input batch to export with.
        metadata: JSON-serializable; stored under :data:`METADATA_KEY`.

    Returns:
        The serialized ONNX model.

    Raises:
        RuntimeError: If the exporter cannot export the network (the message says why).
        MissingExtraError: Without the ``[export]`` extra.

    Example:
        >>> blob = onnx_bytes(nn.Linear(4, 2), torch.randn(1, 4), {"classes": ["a", "b"]})
        >>> len(blob) > 0
        True
    """
    return _export(network, (example,), metadata)


def qdq_onnx_bytes(qdq_network: nn.Module, example: tuple | torch.Tensor,
                   metadata: Mapping[str, Any] | None = None) -> bytes:
    """Export a network in QDQ form (:func:`~lightning_compress.quantization.backend.qdq_network`) to int8 ONNX.

    Args:
        qdq_network: The QDQ-form network.
        example: An input batch (or a tuple of positional inputs) to export with.
        metadata: JSON-serializable; stored under :data:`METADATA_KEY`.

    Returns:
        The serialized QDQ ONNX model: int8 weight initializers, ``QuantizeLinear``/``DequantizeLinear``
        around every quantized value.

    Raises:
        RuntimeError: If the exporter cannot export the network.

    Example:
        >>> from lightning_compress.quantization import backend
        >>> prepared = backend.prepare(nn.Sequential(nn.Linear(4, 2)), mode="static")
        >>> _ = backend.calibrate(prepared, [(torch.randn(8, 4),)])
        >>> blob = qdq_onnx_bytes(backend.qdq_network(prepared), torch.randn(1, 4))
        >>> sorted(quantization_summary(blob)["ops"])
        ['DequantizeLinear', 'Gemm', 'QuantizeLinear']
    """
    return _export(qdq_network, example if isinstance(example, tuple) else (example,), metadata)


def quantization_summary(model: bytes | str | os.PathLike[str]) -> dict[str, Any]:
    """What a QDQ ONNX model quantizes and how: op types, zero-point dtypes and values, weight axes.

    Args:
        model: The ONNX model (bytes or file).

    Returns:
        ``{"ops": set of op types, "activation_zero_points": [(dtype name, value), ...],
        "weights": [(dtype name, axis, all zero-points 0), ...]}``; activations are quantized by
        ``QuantizeLinear``, weights are int8 initializers read by ``DequantizeLinear``.

    Example:
        >>> quantization_summary(onnx_bytes(nn.Linear(4, 2), torch.randn(1, 4)))["weights"]
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


def onnx_session(source: str | os.PathLike[str] | bytes, threads: int = 1) -> Any:
    """An onnxruntime CPU session (all graph optimizations: QDQ fusion into int8 kernels).

    Args:
        source: An ONNX file or its bytes.
        threads: Intra-op threads.

    Returns:
        The ``onnxruntime.InferenceSession``.

    Raises:
        ValueError: If onnxruntime cannot load the model (the message says why).

    Example:
        >>> session = onnx_session(onnx_bytes(nn.Linear(4, 2), torch.randn(1, 4)))
        >>> session.get_inputs()[0].name
        'images'
    """
    require_onnx("onnxruntime inference")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                            providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ValueError(f"onnxruntime cannot load the model: {str(err).strip().splitlines()[0]}") from err


def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata that :func:`onnx_bytes` / :func:`qdq_onnx_bytes` stored in an ONNX file.

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


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX model run by onnxruntime, as an ``nn.Module``: CPU float tensors in, logits out.

    The model's bytes are a ``uint8`` buffer, so ``state_dict``, ``copy.deepcopy`` and ``torch.save`` carry
    it; the session is created on first use. Inputs on another device are moved to CPU and the output
    is returned on the input's device.

    Args:
        model: The ONNX model's bytes.
        threads: onnxruntime intra-op threads (default: torch's thread count).

    Example:
        >>> net = OnnxRuntimeNetwork(onnx_bytes(nn.Linear(4, 2), torch.randn(1, 4)))
        >>> net(torch.ones(2, 4)).dtype
        torch.float32
    """

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        super().__init__()
        self.register_buffer("onnx_model", torch.frombuffer(bytearray(model), dtype=torch.uint8))
        self.threads = threads
        self._session: Any = None

    def model_bytes(self) -> bytes:
        """The ONNX model, serialized.

        Returns:
            The bytes.
        """
        return self.onnx_model.cpu().numpy().tobytes()

    def session(self) -> Any:
        """The onnxruntime session (created on first call).

        Returns:
            The ``InferenceSession``.
        """
        if self._session is None:
            self._session = onnx_session(self.model_bytes(), self.threads or torch.get_num_threads())
        return self._session

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        session = self.session()
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = session.run(None, {session.get_inputs()[0].name: array})[0]
        return torch.from_numpy(logits).to(images.device)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_session"] = None  # sessions neither pickle nor deep-copy
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "onnx_model"
        if key in state_dict:  # the stored model may differ in size from the current one
            self.onnx_model = torch.empty_like(state_dict[key])
            self._session = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
