"""ExecuTorch: a network lowered to XNNPACK's kernels in one ``.pte`` program, for phones and small CPUs.

The network (fp32, or the quantize/dequantize graph of the PT2E engine ``xnnpack``) is captured by
``torch.export`` with a dynamic batch size, its supported operators delegated to XNNPACK
(``XnnpackPartitioner``) and serialized; ExecuTorch's runtime runs the file with no Python model code.
ExecuTorch is the optional ``[executorch]`` extra.

Example:
    >>> # blob = pte_bytes(network, images[:2]); ExecuTorchNetwork(blob)(images)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.onnx import require_packages
from lightning_compress.quantization.engines import EXECUTORCH_EXTRA

MAX_BATCH = 1024
"""Largest batch a ``.pte`` program takes (ExecuTorch plans memory for a bounded batch dimension)."""
EXPORT_BATCH = 16
"""Batch the program is exported with: from a batch-2 example ExecuTorch 1.5's program takes at most 15 images."""


def require_executorch(purpose: str) -> None:
    """Fail with one line naming the pip command when ExecuTorch is missing.

    Args:
        purpose: What needs it, for the message.

    Raises:
        MissingExtraError: If ``executorch`` cannot be imported.
    """
    require_packages(("executorch.runtime",), purpose, EXECUTORCH_EXTRA)


def pte_bytes(network: nn.Module, example: torch.Tensor) -> bytes:
    """The ExecuTorch program of ``network``, XNNPACK-delegated, batch size dynamic up to :data:`MAX_BATCH`.

    Args:
        network: The network, in eval mode, on CPU.
        example: An input batch (repeated to :data:`EXPORT_BATCH` images).

    Returns:
        The ``.pte`` file's bytes.

    Raises:
        RuntimeError: If ``torch.export`` or ExecuTorch cannot lower the network (the message says why).
        MissingExtraError: Without the ``[executorch]`` extra.
    """
    require_executorch("an ExecuTorch program")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = example.repeat(-(-EXPORT_BATCH // len(example)), *([1] * (example.dim() - 1)))[:EXPORT_BATCH]
    try:
        with torch.no_grad():
            program = torch.export.export(network.eval(), (example,), dynamic_shapes=({0: batch},))
            return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    except Exception as err:  # torch.export and ExecuTorch raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(f"ExecuTorch cannot lower this network: {type(err).__name__}: {first}") from err


class ExecuTorchNetwork(nn.Module):
    """An ExecuTorch program run by ExecuTorch's runtime, as an ``nn.Module``: CPU float tensors in, logits out.

    XNNPACK's kernels run on ExecuTorch's own thread pool (one per process, as many threads as the CPU has cores),
    not on torch's threads.

    Args:
        source: The ``.pte`` file or its bytes.

    Raises:
        MissingExtraError: Without the ``[executorch]`` extra.
    """

    def __init__(self, source: str | os.PathLike[str] | bytes) -> None:
        super().__init__()
        require_executorch("the executorch runtime")
        from executorch.runtime import Runtime

        if isinstance(source, bytes):  # the runtime reads files
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.pte"
                path.write_bytes(source)
                self._method: Any = Runtime.get().load_program(path).load_method("forward")
        else:
            self._method = Runtime.get().load_program(Path(source)).load_method("forward")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = images.detach().to("cpu", torch.float32)
        logits = [self._method.execute([chunk.contiguous()])[0] for chunk in inputs.split(MAX_BATCH)]
        return torch.cat(logits).to(images.device)
