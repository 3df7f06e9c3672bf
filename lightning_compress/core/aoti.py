"""AOTInductor in-process: compile a network ahead of time into one ``.pt2`` package and run it.

The ``x86_inductor`` engine ships this package, so quantization builds and runs it at conversion (``trainer.test()``
then measures the very file a deployment ships) and the export writes the same file; both need it. The network
(fp32, or the quantize/dequantize graph of the PT2E engine ``x86_inductor``) is captured by ``torch.export``
with a dynamic batch size and compiled by Inductor with constant folding ("freezing", which lowers the int8
pattern to oneDNN's int8 convolutions). Building needs a C++ compiler; running needs only torch
(``torch._inductor.aoti_load_package``), no Python model code.

Example:
    >>> # aoti_package(network, images[:2], "model.pt2"); AotiNetwork("model.pt2")(images)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.files import atomic_path
from lightning_compress.core.programs import ProgramNetwork

COMPILERS = ("c++", "g++", "clang++")
"""What Inductor may call to build the package (or the compiler named by ``CXX``)."""


def has_compiler() -> bool:
    """Whether a C++ compiler is on ``PATH`` (or named by ``CXX``): building a package needs one.

    Example:
        >>> isinstance(has_compiler(), bool)
        True
    """
    return bool(os.environ.get("CXX") and shutil.which(os.environ["CXX"])) or any(map(shutil.which, COMPILERS))


def require_compiler() -> None:
    """Fail with one line when no C++ compiler is on ``PATH`` (building a package needs one).

    Raises:
        RuntimeError: Without a compiler; the message names what to install.

    Example:
        >>> require_compiler()
    """
    if not has_compiler():
        raise RuntimeError("an AOTInductor package is compiled at export time and needs a C++ compiler "
                           f"({' or '.join(COMPILERS)} on PATH, or CXX); running it does not")


def aoti_package(network: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Compile ``network`` into an AOTInductor package at ``path`` (written atomically), batch size dynamic.

    Args:
        network: The network, in eval mode, on CPU.
        example: An input batch of at least 2 images (a batch of 1 would be specialized).
        path: The ``.pt2`` file.

    Raises:
        RuntimeError: If there is no C++ compiler, or ``torch.export`` / Inductor cannot compile the network
            (the message says why).
    """
    require_compiler()
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            program = torch.export.export(network.eval(), (example,), dynamic_shapes=({0: batch},))
            with atomic_path(Path(path)) as tmp:
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                         inductor_configs={"freezing": True})
    except Exception as err:  # torch.export and Inductor raise many types for unsupported code
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(f"AOTInductor cannot compile this network: {type(err).__name__}: {first}") from err


class AotiNetwork(ProgramNetwork):
    """An AOTInductor package as an ``nn.Module``: CPU float tensors in, logits out.

    The package's bytes are a ``uint8`` buffer (:class:`~lightning_compress.core.programs.ProgramNetwork`), so
    ``state_dict``, ``copy.deepcopy`` and ``torch.save`` carry it; it is loaded on first use.

    Args:
        source: The ``.pt2`` file or its bytes.
        quantized: Whether the package computes in int8 (a PT2E engine's conversion).
    """

    buffer_name = "aoti_package"

    def __init__(self, source: str | os.PathLike[str] | bytes, quantized: bool = False) -> None:
        super().__init__(source if isinstance(source, bytes) else Path(source).read_bytes(), quantized)

    def _load(self, program: bytes) -> Any:
        with tempfile.TemporaryDirectory() as folder:  # the loader reads files; it keeps what it extracts
            path = Path(folder) / "model.pt2"
            path.write_bytes(program)
            return torch._inductor.aoti_load_package(str(path))
