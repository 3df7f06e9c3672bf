"""ONNX in-process: export a network to ONNX bytes through ``torch.export``, run them with onnxruntime.

Quantization builds and runs its QDQ ONNX model here (the ``onnxruntime`` engines) and the export writes
the same bytes to files, so both need it; onnx, onnxruntime and onnxscript are the optional ``[export]``
extra, checked by :func:`require_onnx`. :class:`OnnxRuntimeNetwork` wraps an onnxruntime session as an
``nn.Module`` so that ``trainer.test()`` runs the very file a deployment ships.

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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress.core.programs import ProgramNetwork

OPSET = 18
"""ONNX opset of every exported model (per-axis DequantizeLinear needs >= 13)."""
METADATA_KEY = "lightning_compress"
"""Metadata-props key holding the JSON metadata (classes, normalization, model description)."""
EXPORT_EXTRA = "pip install 'lightning-compress[export]'"


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the pip command that installs it."""


def require_packages(packages: tuple[str, ...], purpose: str, install: str) -> None:
    """Fail with one line naming the pip command when one of ``packages`` cannot be imported.

    Args:
        packages: Module names to import.
        purpose: What needs them, for the message.
        install: The pip command that installs them.

    Raises:
        MissingExtraError: If one of them cannot be imported.

    Example:
        >>> require_packages(("json",), "reading JSON", "pip install nothing")
    """
    for module in packages:
        try:
            __import__(module)
        except ImportError as err:
            raise MissingExtraError(f"{purpose} needs the '{module}' package, which is not installed: "
                                    f"{install}") from err


def require_onnx(purpose: str) -> None:
    """Fail with one line naming the pip command when onnx, onnxruntime or onnxscript is missing.

    Args:
        purpose: What needs them, for the message (e.g. ``"export"``).

    Raises:
        MissingExtraError: If one of them cannot be imported.

    Example:
        >>> require_onnx("export")
    """
    require_packages(("onnx", "onnxruntime", "onnxscript"), purpose, EXPORT_EXTRA)


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


def onnx_bytes(network: nn.Module, example: torch.Tensor | tuple, metadata: Mapping[str, Any] | None = None,
               translations: Mapping[Any, Callable] | None = None) -> bytes:
    """Export a network to ONNX (dynamic batch size), with ``metadata`` in its metadata props.

    Args:
        network: The network (put in eval mode).
        example: An input batch (or a tuple of positional inputs) to export with.
        metadata: JSON-serializable; stored under :data:`METADATA_KEY`.
        translations: ONNX translations of custom ops, ``{torch op overload: onnxscript function}`` (the QDQ
            ops: :func:`~lightning_compress.quantization.qdq.qdq_onnx_bytes`).

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
    require_onnx("ONNX export")
    example = example if isinstance(example, tuple) else (example,)
    network = network.eval()
    batch = torch.export.Dim("batch", min=1)
    dynamic = ({0: batch},) + tuple(None for _ in example[1:])
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(network, example, dynamo=True, opset_version=OPSET,
                                        input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=dynamic, custom_translation_table=dict(translations or {}),
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
    own_int8_initializers(model)
    return model.SerializeToString()


def own_int8_initializers(model: Any) -> bool:
    """Give each node its own copy of an int8 initializer it shares with other nodes, in place.

    The exporter stores equal constants once (two convolutions' all-zero weight zero-points become one tensor);
    onnxruntime's exact int8 mode (:data:`PRECISE_INT8`) rewrites each weight's int8 tensors to uint8 and fails
    on a tensor it has rewritten already ("Attempt to replace the existing tensor").

    Args:
        model: An ``onnx.ModelProto``.

    Returns:
        Whether anything was copied.

    Example:
        >>> from onnx import TensorProto, helper
        >>> zero = helper.make_tensor("zero", TensorProto.INT8, [1], [0])
        >>> nodes = [helper.make_node("DequantizeLinear", ["codes", "scale", "zero"], [f"w{i}"]) for i in (1, 2)]
        >>> graph = helper.make_graph(nodes, "g", [], [], [zero])
        >>> model = helper.make_model(graph)
        >>> own_int8_initializers(model), [list(node.input) for node in model.graph.node]
        (True, [['codes', 'scale', 'zero'], ['codes', 'scale', 'zero.1']])
    """
    from onnx import TensorProto

    graph = model.graph
    int8 = {t.name: t for t in graph.initializer if t.data_type == TensorProto.INT8}
    names = {t.name for t in graph.initializer} | {output for node in graph.node for output in node.output}
    copies: dict[str, int] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name not in int8:
                continue
            copies[name] = copies.get(name, -1) + 1
            if copies[name] == 0:  # the first user keeps the original
                continue
            while f"{name}.{copies[name]}" in names:
                copies[name] += 1
            tensor = graph.initializer.add()
            tensor.CopyFrom(int8[name])
            tensor.name = node.input[position] = f"{name}.{copies[name]}"
            names.add(tensor.name)
    return any(count > 0 for count in copies.values())


PRECISE_INT8 = {"session.x64quantprecision": "1"}
"""onnxruntime's session configuration for exact int8 products on x86 CPUs without VNNI (AVX2, AVX-512 without
VNNI): there its default uint8 x int8 kernels sum pairs of products into saturating int16 (``vpmaddubsw``), and a
network's answers change; this makes it multiply uint8 x uint8 instead (no effect on CPUs with VNNI)."""


def onnx_session(source: str | os.PathLike[str] | bytes, threads: int = 1) -> Any:
    """An onnxruntime CPU session (all graph optimizations: QDQ fusion into int8 kernels; exact int8 products on
    every x86 CPU, :data:`PRECISE_INT8`).

    Args:
        source: An ONNX file or its bytes.
        threads: Intra-op threads (0: onnxruntime's default).

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
    for key, value in PRECISE_INT8.items():
        options.add_session_config_entry(key, value)
    import onnx

    model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    if own_int8_initializers(model):  # a file written before its initializers were unshared
        source = model.SerializeToString()
    try:
        return onnxruntime.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                            providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ValueError(f"onnxruntime cannot load the model: {str(err).strip().splitlines()[0]}") from err


class OnnxRuntimeNetwork(ProgramNetwork):
    """An ONNX model run by onnxruntime, as an ``nn.Module``: CPU float tensors in, logits out.

    The model's bytes are a ``uint8`` buffer (:class:`~lightning_compress.core.programs.ProgramNetwork`), so
    ``state_dict``, ``copy.deepcopy`` and ``torch.save`` carry it; the session is created on first use.

    Args:
        model: The ONNX model's bytes.
        threads: onnxruntime intra-op threads (default: torch's thread count).

    Example:
        >>> net = OnnxRuntimeNetwork(onnx_bytes(nn.Linear(4, 2), torch.randn(1, 4)))
        >>> net(torch.ones(2, 4)).dtype
        torch.float32
    """

    buffer_name = "onnx_model"

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        super().__init__(model)
        self.threads = threads

    def _load(self, program: bytes) -> Callable[[torch.Tensor], Any]:
        session = onnx_session(program, self.threads or torch.get_num_threads())
        name = session.get_inputs()[0].name
        return lambda images: session.run(None, {name: images.numpy()})[0]
