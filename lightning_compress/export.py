"""Deployable artifacts: packed sparse weights, ONNX, the int8 TorchScript model, and their readers.

* **Packed weights** (``.lcpk``, Deep Compression style): every weight tensor (>= 2 dims) is stored
  as a bitmask of its non-zeros plus the non-zero values, in ``int8`` (symmetric, one scale per
  output channel) or ``fp16``; a dense tensor skips the bitmask when that is smaller. Other tensors
  (biases, BatchNorm statistics, quantizer buffers) are stored raw, exactly. The whole payload is
  then compressed with ``lzma`` (or ``zlib``). :func:`read_packed` restores every tensor exactly:
  fp16 values bit for bit, int8 values as exactly ``q * scale``.
* **ONNX**: written with torch's TorchScript-based exporter (``dynamo=False``). It is deprecated in
  torch 2.14, but it is the exporter that handles int8 models: the ``torch.export``-based one fails on
  the FX-converted int8 modules ("Failed to export the model with torch.export"), and takes ~15 s
  to start. Models are checked against the torch model with onnxruntime (:func:`onnx_agreement`).
* **int8 model**: TorchScript, through :func:`lightning_compress.quantization.backend.save_quantized`.

Each self-contained artifact (``.lcpk``, ``.onnx``) carries the metadata :func:`load_artifact` needs
to classify images: class names, input size and normalization; the int8 ``.pt`` file takes them from
the ``manifest.json`` that :func:`export_artifacts` writes beside it.

Example:
    >>> import torch
    >>> weights = {"w": torch.tensor([[0.5, 0.0], [0.0, -0.25]])}
    >>> restored, meta = unpack_state_dict(pack_state_dict(weights, {"classes": ["a"]}, values="fp16"))
    >>> torch.equal(restored["w"], weights["w"]), meta["classes"]
    (True, ['a'])
"""

from __future__ import annotations

import copy
import io
import json
import lzma
import math
import os
import shutil
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.architecture import ArchitectureRecord, replay_onto_network
from lightning_compress.core.files import atomic_path, write_text_atomic
from lightning_compress.models import create_model
from lightning_compress.pruning.masks import pack_mask, unpack_mask

VALUE_FORMATS: tuple[str, ...] = ("int8", "fp16")
"""How the non-zero weight values are stored in a packed artifact."""
CODECS: dict[str, tuple[bytes, Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "lzma": (b"L", lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    "zlib": (b"Z", lambda data: zlib.compress(data, 9), zlib.decompress),
}
"""General-purpose compressors applied to the packed payload: name -> (tag, compress, decompress)."""
MAGIC = b"LCPACK1\n"
PACKED_SUFFIX = ".lcpk"
MANIFEST = "manifest.json"
FILES = {"packed": "weights.lcpk", "int8": "model_int8.pt", "onnx_fp32": "model_fp32.onnx",
         "onnx_int8": "model_int8.onnx"}
"""File names inside an export directory."""
_ONNX_METADATA_KEY = "lightning_compress"


# ---------------------------------------------------------------------------------------- packing
def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def int8_weight_quantization(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per output channel (dim 0); zeros stay zero.

    Args:
        weight: A float tensor with at least 2 dimensions.

    Returns:
        ``(q, scale)``: ``int8`` values in ``[-127, 127]`` and ``float32`` scales of shape ``(C_out,)``;
        the dequantized weight is ``q * scale`` broadcast over dim 0.

    Example:
        >>> q, scale = int8_weight_quantization(torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
        >>> q.tolist(), scale.tolist()
        ([[127, -64], [0, 0]], [0.007874015718698502, 1.0])
    """
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    amax = flat.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float().reshape(q.shape[0], -1) * scale[:, None]).reshape(q.shape)


def pack_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    values: str = "int8",
    codec: str = "lzma",
) -> bytes:
    """Encode a state dict as a packed artifact (see the module docstring for the format).

    Args:
        state_dict: Tensors by name (any dtype; float tensors with >= 2 dims are packed).
        metadata: JSON-serializable information stored with the weights.
        values: ``"int8"`` or ``"fp16"``, the storage of non-zero weight values.
        codec: ``"lzma"`` or ``"zlib"``.

    Returns:
        The artifact's bytes.

    Raises:
        ValueError: On an unknown ``values`` or ``codec``.

    Example:
        >>> blob = pack_state_dict({"w": torch.zeros(64, 64)}, values="int8")
        >>> len(blob) < 64 * 64 * 4 // 50  # all-zero weights: a bitmask of zeros, then lzma
        True
    """
    if values not in VALUE_FORMATS:
        raise ValueError(f"values must be one of {list(VALUE_FORMATS)}, got {values!r}")
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {list(CODECS)}, got {codec!r}")
    entries, chunks, offset = [], [], 0

    def add(data: bytes) -> list[int]:
        nonlocal offset
        chunks.append(data)
        offset += len(data)
        return [offset - len(data), len(data)]

    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        entry: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype)[6:]}
        if tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel():
            if values == "int8":
                stored, scale = int8_weight_quantization(tensor)
                entry["scale"] = add(_raw_bytes(scale))
            else:
                stored = tensor.to(torch.float16)
            # bit-level for fp16, so that -0.0 survives: restoration is bit for bit
            mask = stored != 0 if values == "int8" else stored.view(torch.int16) != 0
            nonzero = int(mask.sum())
            value_bytes = stored.element_size()
            if math.ceil(tensor.numel() / 8) + nonzero * value_bytes < tensor.numel() * value_bytes:
                entry["mask"] = add(_raw_bytes(pack_mask(mask)))
                stored = stored[mask]
            entry["encoding"] = values
            entry["values"] = add(_raw_bytes(stored))
        else:
            entry["encoding"] = "raw"
            entry["values"] = add(_raw_bytes(tensor))
        entries.append(entry)
    header = json.dumps({"values": values, "metadata": dict(metadata or {}), "tensors": entries}).encode()
    payload = struct.pack("<Q", len(header)) + header + b"".join(chunks)
    tag, compress, _ = CODECS[codec]
    return MAGIC + tag + compress(payload)


def unpack_state_dict(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decode :func:`pack_state_dict`'s bytes into the state dict and the metadata.

    Weights come back as ``float32`` (or their original float dtype): an fp16-packed value is the
    original rounded to fp16, bit for bit; an int8-packed one is exactly ``q * scale``.

    Args:
        blob: The artifact's bytes.

    Returns:
        ``(state_dict, metadata)``.

    Raises:
        ValueError: If ``blob`` is not a packed artifact or is damaged.

    Example:
        >>> unpack_state_dict(b"not an artifact")
        Traceback (most recent call last):
        ...
        ValueError: not a packed lightning-compress artifact (expected it to start with b'LCPACK1\\n')
    """
    if not blob.startswith(MAGIC):
        raise ValueError(f"not a packed lightning-compress artifact (expected it to start with {MAGIC!r})")
    tag = blob[len(MAGIC):len(MAGIC) + 1]
    decompress = next((d for t, _, d in CODECS.values() if t == tag), None)
    try:
        if decompress is None:
            raise ValueError(f"unknown codec tag {tag!r}")
        payload = decompress(blob[len(MAGIC) + 1:])
        (header_len,) = struct.unpack("<Q", payload[:8])
        header = json.loads(payload[8:8 + header_len])
        data = memoryview(payload)[8 + header_len:]
        state = {}
        for entry in header["tensors"]:
            state[entry["name"]] = _decode(entry, data)
    except (lzma.LZMAError, zlib.error, struct.error, json.JSONDecodeError, KeyError, RuntimeError) as err:
        raise ValueError(f"damaged packed artifact ({type(err).__name__}: {err})") from err
    return state, header["metadata"]


def _decode(entry: dict[str, Any], data: memoryview) -> torch.Tensor:
    def chunk(key: str) -> bytes:
        start, length = entry[key]
        return bytes(data[start:start + length])

    shape, dtype = entry["shape"], getattr(torch, entry["dtype"])
    if entry["encoding"] == "raw":
        return _from_bytes(chunk("values"), dtype, shape)
    stored_dtype = torch.int8 if entry["encoding"] == "int8" else torch.float16
    stored = _from_bytes(chunk("values"), stored_dtype, [-1])
    if "mask" in entry:
        mask = unpack_mask(_from_bytes(chunk("mask"), torch.uint8, [-1]), shape)
        dense = torch.zeros(shape, dtype=stored_dtype)
        dense[mask] = stored
        stored = dense
    stored = stored.reshape(shape)
    if entry["encoding"] == "int8":
        return _dequantize(stored, _from_bytes(chunk("scale"), torch.float32, [-1])).to(dtype)
    return stored.to(dtype)


def write_packed(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any] | None = None, values: str = "int8", codec: str = "lzma") -> int:
    """Write :func:`pack_state_dict`'s bytes to ``path`` atomically.

    Args:
        path: Destination (``.lcpk`` by convention).
        state_dict: Tensors by name.
        metadata: JSON-serializable information stored with the weights.
        values: ``"int8"`` or ``"fp16"``.
        codec: ``"lzma"`` or ``"zlib"``.

    Returns:
        The number of bytes written.

    Example:
        >>> # write_packed("weights.lcpk", model.state_dict(), {"model": "resnet20"})
    """
    blob = pack_state_dict(state_dict, metadata, values, codec)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return len(blob)


def read_packed(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`write_packed`.

    Args:
        path: The file.

    Returns:
        ``(state_dict, metadata)``.

    Raises:
        ValueError: If the file is not a packed artifact or is damaged (the message names the file).

    Example:
        >>> # state, meta = read_packed("weights.lcpk")
    """
    try:
        return unpack_state_dict(Path(path).read_bytes())
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


# ------------------------------------------------------------------------------------- networks
def build_network(metadata: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a zoo network from artifact/checkpoint metadata and (optionally) load its weights.

    ``metadata`` holds ``model`` (a zoo name), ``num_classes``, ``model_kwargs`` and optionally
    ``architecture``: the checkpoint's architecture records (channel slimming, QAT preparation, ...; see
    :mod:`lightning_compress.core.architecture`), replayed before the weights load.

    Args:
        metadata: The description above.
        state_dict: The network's weights (keys relative to the network).

    Returns:
        The network, in eval mode, on CPU.

    Example:
        >>> net = build_network({"model": "resnet20", "num_classes": 10, "model_kwargs": {}})
        >>> type(net).__name__
        'ResNet'
    """
    network = create_model(metadata["model"], num_classes=metadata["num_classes"], **metadata.get("model_kwargs", {}))
    records = [ArchitectureRecord.from_dict(record) for record in metadata.get("architecture") or []]
    network = replay_onto_network(network, records)
    if state_dict is not None:
        network.load_state_dict(state_dict)
    return network.eval()


# ----------------------------------------------------------------------------------------- ONNX
def onnx_bytes(network: nn.Module, example: torch.Tensor, metadata: Mapping[str, Any]) -> bytes:
    """Export ``network`` to ONNX (dynamic batch size), with ``metadata`` in its metadata props.

    Args:
        network: An fp32 or int8 (FX-converted) network.
        example: An input batch to trace with.
        metadata: JSON-serializable; stored under the ``lightning_compress`` metadata key.

    Returns:
        The serialized ONNX model.

    Raises:
        RuntimeError: If the exporter cannot export the network (e.g. unsupported int8 ops).

    Example:
        >>> blob = onnx_bytes(nn.Linear(4, 2), torch.randn(1, 4), {"classes": ["a", "b"]})
        >>> blob[:2] != b""
        True
    """
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        try:
            torch.onnx.export(network.eval(), (example,), buffer, dynamo=False, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        except Exception as err:  # the exporter raises many types for unsupported ops
            raise RuntimeError(f"the ONNX exporter cannot export this network: {type(err).__name__}: {err}") from err
    model = onnx.load_from_string(buffer.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = _ONNX_METADATA_KEY, json.dumps(dict(metadata))
    return model.SerializeToString()


def _onnx_session(source: str | os.PathLike[str] | bytes) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                        providers=["CPUExecutionProvider"])


def onnx_agreement(model: str | os.PathLike[str] | bytes, network: nn.Module, images: torch.Tensor) -> float:
    """Fraction of ``images`` on which onnxruntime and the torch ``network`` predict the same class.

    Args:
        model: An ONNX file or its bytes.
        network: The torch network it was exported from.
        images: A batch of model inputs.

    Returns:
        Top-1 agreement in ``[0, 1]``.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> x = torch.randn(8, 4)
        >>> onnx_agreement(onnx_bytes(net, x[:1], {}), net, x)
        1.0
    """
    session = _onnx_session(model)
    logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        expected = network.eval()(images).argmax(1)
    return float((torch.from_numpy(logits).argmax(1) == expected).float().mean())


# -------------------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """What :func:`export_artifacts` wrote.

    Attributes:
        directory: The export directory.
        manifest: The content of its ``manifest.json``: metadata, files with sizes, checks, skipped items.
    """

    directory: Path
    manifest: dict[str, Any]


def check_export_directory(directory: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a non-empty existing directory unless ``overwrite``; refuse a file.

    Args:
        directory: The destination.
        overwrite: Whether its content may be replaced.

    Returns:
        The directory as a path.

    Raises:
        FileExistsError: If ``directory`` is a file, or a non-empty directory and not ``overwrite``.

    Example:
        >>> check_export_directory("/nonexistent/export", overwrite=False).name
        'export'
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"export destination {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"export directory {path} exists and is not empty; pass --overwrite to replace "
                              "its content, or choose another directory")
    return path


def export_artifacts(
    network: nn.Module,
    metadata: Mapping[str, Any],
    directory: str | os.PathLike[str],
    images: torch.Tensor,
    int8_network: nn.Module | None = None,
    values: str = "int8",
    overwrite: bool = False,
    min_agreement: float = 0.99,
) -> ExportResult:
    """Write every deployable artifact of a network into ``directory``, all or nothing.

    Files (see :data:`FILES`): the packed weights of ``network``; for an fp32 ``network`` the fp32
    ONNX model; with ``int8_network`` the int8 TorchScript model and the int8 ONNX model. Every ONNX
    model is checked with onnxruntime against its torch network on ``images`` (top-1 agreement at least
    ``min_agreement``). Everything is written into a temporary sibling directory that is renamed into
    place at the end, so ``directory`` never holds a half-written export.

    Args:
        network: The network (fp32, possibly sparse; or QAT-prepared) whose weights are packed.
        metadata: See :func:`build_network`; plus ``classes``, ``mean``, ``std``, ``input_size``.
        directory: Destination directory.
        images: Model inputs for tracing and the onnxruntime check (a batch of normalized images).
        int8_network: The int8 (converted) network, if there is one.
        values: Storage of non-zero packed values: ``"int8"`` or ``"fp16"``.
        overwrite: Replace the content of a non-empty ``directory``.
        min_agreement: Minimal ONNX-vs-torch top-1 agreement.

    Returns:
        What was written.

    Raises:
        FileExistsError: See :func:`check_export_directory`.
        RuntimeError: If an ONNX model disagrees with its torch network (nothing is written).

    Example:
        >>> # export_artifacts(net, meta, "export/", torch.randn(64, 3, 32, 32))
    """
    from lightning_compress.quantization import backend

    if values not in VALUE_FORMATS:
        raise ValueError(f"values must be one of {list(VALUE_FORMATS)}, got {values!r}")
    final = check_export_directory(directory, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    manifest: dict[str, Any] = {"metadata": dict(metadata), "files": {}, "checks": {}, "skipped": {}}
    try:
        network = network.cpu().eval()
        write_packed(staging / FILES["packed"], network.state_dict(), metadata, values)
        manifest["packed_values"] = values
        models = {}
        if backend.is_prepared(network):
            manifest["skipped"]["onnx_fp32"] = ("the network holds quantization-aware-training fake-quant modules; "
                                                "its deployable form is the int8 model")
        else:
            models["onnx_fp32"] = network
        if int8_network is None:
            manifest["skipped"]["int8"] = ("no int8 model: the checkpoint is fp32 (train with "
                                           "QuantizationAwareTraining to get one)")
        else:
            backend.save_quantized(int8_network, staging / FILES["int8"], (images[:1],),
                                   metadata.get("quantization", {}).get("engine", "x86"))
            models["onnx_int8"] = int8_network
        for key, model in models.items():
            try:
                blob = onnx_bytes(model, images[:1], metadata)
            except RuntimeError as err:
                if key != "onnx_int8":
                    raise
                manifest["skipped"][key] = str(err)
                continue
            agreement = onnx_agreement(blob, model, images)
            manifest["checks"][f"{key}_top1_agreement"] = agreement
            if agreement < min_agreement:
                raise RuntimeError(f"{FILES[key]}: onnxruntime agrees with the torch model on only "
                                   f"{agreement:.1%} of {len(images)} images (< {min_agreement:.0%}); not exported")
            with atomic_path(staging / FILES[key]) as tmp:
                tmp.write_bytes(blob)
        manifest["files"] = {key: {"name": name, "bytes": (staging / name).stat().st_size}
                             for key, name in FILES.items() if (staging / name).exists()}
        write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _replace_directory(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(final, manifest)


def _replace_directory(staging: Path, final: Path) -> None:
    """Move ``staging`` to ``final``; an old ``final`` is moved aside first and deleted last."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old.{os.getpid()}"
        os.replace(final, old)
    try:
        os.replace(staging, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- reading
@dataclass
class Artifact:
    """A loaded model artifact, ready to classify preprocessed images.

    Attributes:
        path: The file it was loaded from.
        kind: ``"packed"``, ``"onnx"`` or ``"int8"``.
        metadata: ``classes``, ``mean``, ``std``, ``input_size`` and the model description.
        logits: Maps a ``(N, 3, H, W)`` float batch of normalized images to ``(N, classes)`` logits.
    """

    path: Path
    kind: str
    metadata: dict[str, Any]
    logits: Callable[[torch.Tensor], torch.Tensor]


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Load an exported model: an export directory, ``weights.lcpk``, an ``.onnx`` file or ``model_int8.pt``.

    A directory is read through its best model: the int8 model if present, else the fp32 ONNX model,
    else the packed weights.

    Args:
        path: The artifact.

    Returns:
        The loaded artifact.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If it is not an artifact written by :func:`export_artifacts` (says what was expected).

    Example:
        >>> # artifact = load_artifact("export/"); artifact.logits(images)
    """
    from lightning_compress.quantization import backend

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.is_dir():
        for key in ("int8", "onnx_fp32", "packed"):
            if (path / FILES[key]).exists():
                return load_artifact(path / FILES[key])
        raise ValueError(f"{path} holds none of {sorted(FILES.values())}; expected a directory written by "
                         "`lightning-compress export`")
    if path.suffix == PACKED_SUFFIX:
        state, metadata = read_packed(path)
        network = build_network(metadata, state)
        return Artifact(path, "packed", metadata, _torch_logits(network))
    if path.suffix == ".onnx":
        import onnx

        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as err:  # onnx raises DecodeError and others on damaged files
            raise ValueError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err})") from err
        if _ONNX_METADATA_KEY not in props:
            raise ValueError(f"{path} has no '{_ONNX_METADATA_KEY}' metadata; expected an ONNX model written by "
                             "`lightning-compress export`")
        session = _onnx_session(path)
        name = session.get_inputs()[0].name
        return Artifact(path, "onnx", json.loads(props[_ONNX_METADATA_KEY]),
                        lambda images: torch.from_numpy(session.run(None, {name: images.numpy()})[0]))
    if path.suffix == ".pt":
        manifest = path.parent / MANIFEST
        if not manifest.exists():
            raise ValueError(f"{path}: an int8 model needs the {MANIFEST} of its export directory beside it "
                             "(class names and normalization live there)")
        network = backend.load_quantized(path)
        return Artifact(path, "int8", json.loads(manifest.read_text())["metadata"], _torch_logits(network))
    raise ValueError(f"{path}: unknown model file type {path.suffix!r}; expected an export directory, "
                     f"{FILES['packed']}, an .onnx file or {FILES['int8']}")


def _torch_logits(network: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def logits(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(images)

    return logits


def int8_from_qat(network: nn.Module, engine: str) -> nn.Module:
    """Convert a copy of a QAT-prepared network to int8 (the network itself is left as it is).

    Args:
        network: A network prepared for quantization-aware training.
        engine: The int8 engine it was prepared for.

    Returns:
        The int8 network.

    Example:
        >>> # int8 = int8_from_qat(prepared_network, "x86")
    """
    from lightning_compress.quantization import backend

    return backend.convert(copy.deepcopy(network), engine)
