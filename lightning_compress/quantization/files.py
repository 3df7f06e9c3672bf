"""Int8 models of torch's engines as files: frozen TorchScript that records its engine.

Why TorchScript, traced, frozen and deflated: ``docs/quantization-design.md``.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from lightning_compress.core.files import write_zip_deflated
from lightning_compress.quantization.deprecations import quiet_torch_ao
from lightning_compress.quantization.engines import Engine, check_engine

_ENGINE_FILE = "quantized_engine"


def save_quantized(
    model: nn.Module, path: str | os.PathLike, example_inputs: tuple, engine: str | Engine = "x86"
) -> Path:
    """Write an int8 model as TorchScript, atomically (temp file + rename), recording its engine.

    The model is traced and frozen (numerics untouched), the archive deflated; plain ``torch.jit.load`` and
    LibTorch read it as is.

    Args:
        model: An int8 model from :func:`~lightning_compress.quantization.convert.convert`.
        path: Destination file (``.pt``).
        example_inputs: Positional inputs to trace with, e.g. ``(torch.randn(1, 3, 32, 32),)``.
        engine: The engine it was converted for (restored by :func:`load_quantized`).

    Returns:
        The written path.

    Example:
        >>> # save_quantized(int8_model, "model_int8.pt", (torch.randn(1, 3, 32, 32),))
    """
    engine = check_engine(engine)
    path = Path(path)
    with quiet_torch_ao():
        with torch.no_grad():
            traced = torch.jit.trace(model.cpu().eval(), tuple(example_inputs))
            scripted = torch.jit.freeze(traced, optimize_numerics=False)
    archive = io.BytesIO()
    with quiet_torch_ao():
        torch.jit.save(scripted, archive, _extra_files={_ENGINE_FILE: engine.name})
    write_zip_deflated(archive.getvalue(), path)
    return path


def load_quantized(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load an int8 model written by :func:`save_quantized`, setting its engine first.

    Args:
        path: The file.

    Returns:
        The TorchScript module (CPU, eval mode).

    Raises:
        ValueError: If the file was not written by :func:`save_quantized`.

    Example:
        >>> # model = load_quantized("model_int8.pt"); model(images)
    """
    with zipfile.ZipFile(path) as archive:
        entry = next((n for n in archive.namelist() if n.endswith(f"/extra/{_ENGINE_FILE}")), None)
        if entry is None:
            raise ValueError(f"{path} is not an int8 model written by save_quantized (no engine record)")
        engine = archive.read(entry).decode()
    torch.backends.quantized.engine = check_engine(engine).name
    with quiet_torch_ao():
        return torch.jit.load(str(path), map_location="cpu").eval()
