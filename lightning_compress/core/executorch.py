"""ExecuTorch in-process: lower a network to an XNNPACK-delegated ``.pte`` program and run it.

The ``xnnpack`` engine ships this program, so quantization builds and runs it at conversion (``trainer.test()``
then measures the very file a deployment ships) and the export writes the same bytes; both need it.
ExecuTorch is the optional ``[executorch]`` extra, checked by :func:`require_executorch`.

Example:
    >>> # net = ExecuTorchNetwork(pte_bytes(network, images[:2])); net(images)
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lightning_compress.core.onnx import require_packages
from lightning_compress.core.programs import ProgramNetwork

EXECUTORCH_EXTRA = "pip install 'lightning-compress[executorch]'"
"""How to install ExecuTorch (the ``xnnpack`` engine's quantizer and runtime)."""
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


def use_threads(threads: int) -> None:
    """Size ExecuTorch's thread pool, which XNNPACK's kernels run on: one pool per process, shared by every
    program (resized only when its size differs; never while a program runs).

    Args:
        threads: Threads in the pool.

    Raises:
        MissingExtraError: Without the ``[executorch]`` extra.
    """
    require_executorch("the executorch runtime")
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def pte_bytes(network: nn.Module, example: torch.Tensor) -> bytes:
    """The ExecuTorch program of ``network``, XNNPACK-delegated, batch size dynamic up to :data:`MAX_BATCH`.

    Args:
        network: The network (fp32, or a PT2E quantize/dequantize graph), in eval mode, on CPU; lowered from a copy
            whose tensors are in the default memory format (XNNPACK's layout pass refuses weights that a
            ``channels_last`` network, e.g. ``ImageClassifier(channels_last=True)``, keeps in NHWC strides).
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
            contiguous = copy.deepcopy(network).to(memory_format=torch.contiguous_format)
            program = torch.export.export(contiguous.eval(), (example.contiguous(),), dynamic_shapes=({0: batch},))
            return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    except Exception as err:  # torch.export and ExecuTorch raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(f"ExecuTorch cannot lower this network: {type(err).__name__}: {first}") from err


class ExecuTorchNetwork(ProgramNetwork):
    """An ExecuTorch program run by ExecuTorch's runtime, as an ``nn.Module``: CPU float tensors in, logits out.

    The program's bytes are a ``uint8`` buffer (:class:`~lightning_compress.core.programs.ProgramNetwork`), so
    ``state_dict``, ``copy.deepcopy`` and ``torch.save`` carry it; the runtime loads it on first use. XNNPACK's
    kernels run on ExecuTorch's own thread pool (one per process, as many threads as the CPU has cores), not on
    torch's threads.

    Args:
        source: The ``.pte`` file or its bytes.
        quantized: Whether the program computes in int8 (a PT2E engine's conversion).

    Raises:
        MissingExtraError: Without the ``[executorch]`` extra.
    """

    buffer_name = "pte_program"

    def __init__(self, source: str | os.PathLike[str] | bytes, quantized: bool = False) -> None:
        require_executorch("the executorch runtime")
        super().__init__(source if isinstance(source, bytes) else Path(source).read_bytes(), quantized)

    def _load(self, program: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
        from executorch.runtime import Runtime

        with tempfile.TemporaryDirectory() as folder:  # the runtime reads files
            path = Path(folder) / "model.pte"
            path.write_bytes(program)
            method = Runtime.get().load_program(path).load_method("forward")
        return lambda images: torch.cat([method.execute([chunk])[0] for chunk in images.split(MAX_BATCH)])
