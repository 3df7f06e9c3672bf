"""Packed sparse weights (``.lcpk``, Deep Compression style), written and read back exactly.

Every weight tensor (>= 2 dims) is stored as a bitmask of its non-zeros plus the non-zero values, in
``int8`` (symmetric, one scale per output channel) or ``fp16``; a dense tensor skips the bitmask when
that is smaller. Other tensors (biases, BatchNorm statistics, quantizer buffers) are stored raw, exactly.
The whole payload is then compressed with ``lzma`` (or ``zlib``). :func:`read_packed` restores every
tensor exactly: fp16 values bit for bit, int8 values as exactly ``q * scale``. The file carries the
metadata :func:`lightning_compress.export.load_artifact` needs to rebuild and run the network.

Example:
    >>> import torch
    >>> weights = {"w": torch.tensor([[0.5, 0.0], [0.0, -0.25]])}
    >>> restored, meta = unpack_state_dict(pack_state_dict(weights, {"classes": ["a"]}, values="fp16"))
    >>> torch.equal(restored["w"], weights["w"]), meta["classes"]
    (True, ['a'])
"""

from __future__ import annotations

import json
import lzma
import math
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_compress.core.files import atomic_path
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
