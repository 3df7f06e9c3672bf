"""ExecuTorch in-process: lower a network to an XNNPACK-delegated ``.pte`` program and run it.

The ``xnnpack`` engine ships this program, so quantization builds and runs it at conversion (``trainer.test()``
then measures the very file a deployment ships) and the export writes the same bytes; both need it.
ExecuTorch is the optional ``[executorch]`` extra, checked by :func:`require_executorch`.

Example:
    >>> # net = ExecuTorchNetwork(pte_bytes(network, images[:2])); net(images)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.onnx import require_packages

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


def pte_bytes(network: nn.Module, example: torch.Tensor) -> bytes:
    """The ExecuTorch program of ``network``, XNNPACK-delegated, batch size dynamic up to :data:`MAX_BATCH`.

    Args:
        network: The network (fp32, or a PT2E quantize/dequantize graph), in eval mode, on CPU.
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

    The program's bytes are a ``uint8`` buffer, so ``state_dict``, ``copy.deepcopy`` and ``torch.save`` carry it;
    the runtime loads it on first use. Inputs on another device are moved to CPU and the output is returned on
    the input's device. XNNPACK's kernels run on ExecuTorch's own thread pool (one per process, as many threads
    as the CPU has cores), not on torch's threads.

    Args:
        source: The ``.pte`` file or its bytes.
        quantized: Whether the program computes in int8 (a PT2E engine's conversion): :attr:`quantized`.

    Raises:
        MissingExtraError: Without the ``[executorch]`` extra.
    """

    def __init__(self, source: str | os.PathLike[str] | bytes, quantized: bool = False) -> None:
        super().__init__()
        require_executorch("the executorch runtime")
        self.quantized = quantized
        program = source if isinstance(source, bytes) else Path(source).read_bytes()
        self.register_buffer("pte_program", torch.frombuffer(bytearray(program), dtype=torch.uint8))
        self._method: Any = None

    def program_bytes(self) -> bytes:
        """The ``.pte`` program, serialized.

        Returns:
            The bytes.
        """
        return self.pte_program.cpu().numpy().tobytes()

    def method(self) -> Any:
        """The program's ``forward`` method, loaded by ExecuTorch's runtime on first call.

        Returns:
            The runtime's ``Method``.
        """
        if self._method is None:
            from executorch.runtime import Runtime

            with tempfile.TemporaryDirectory() as folder:  # the runtime reads files
                path = Path(folder) / "model.pte"
                path.write_bytes(self.program_bytes())
                self._method = Runtime.get().load_program(path).load_method("forward")
        return self._method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        method = self.method()
        inputs = images.detach().to("cpu", torch.float32)
        logits = [method.execute([chunk.contiguous()])[0] for chunk in inputs.split(MAX_BATCH)]
        return torch.cat(logits).to(images.device)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_method"] = None  # a loaded method neither pickles nor deep-copies
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "pte_program"
        if key in state_dict:  # the stored program may differ in size from the current one
            self.pte_program = torch.empty_like(state_dict[key])
            self._method = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
