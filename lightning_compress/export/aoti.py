"""AOTInductor: a network compiled ahead of time into one ``.pt2`` package of native code and weights.

The network (fp32, or the quantize/dequantize graph of the PT2E engine ``x86_inductor``) is captured by
``torch.export`` with a dynamic batch size and compiled by Inductor with constant folding ("freezing", which
lowers the int8 pattern to oneDNN's int8 convolutions). Building needs a C++ compiler; running needs only torch
(``torch._inductor.aoti_load_package``), no Python model code.

Example:
    >>> # aoti_package(network, images[:2], "model.pt2"); AotiNetwork("model.pt2")(images)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.files import atomic_path

COMPILERS = ("c++", "g++", "clang++")
"""What Inductor may call to build the package (or the compiler named by ``CXX``)."""


def require_compiler() -> None:
    """Fail with one line when no C++ compiler is on ``PATH`` (building a package needs one).

    Raises:
        RuntimeError: Without a compiler; the message names what to install.

    Example:
        >>> require_compiler()
    """
    if not (os.environ.get("CXX") and shutil.which(os.environ["CXX"])) and not any(map(shutil.which, COMPILERS)):
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


class AotiNetwork(nn.Module):
    """An AOTInductor package as an ``nn.Module``: CPU float tensors in, logits out.

    Args:
        path: The ``.pt2`` file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self._runner: Any = torch._inductor.aoti_load_package(str(self.path))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._runner(images.detach().to("cpu", torch.float32).contiguous()).to(images.device)
