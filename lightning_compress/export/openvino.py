"""OpenVINO: the exported ONNX file (fp32, or the QDQ int8 model) compiled by OpenVINO for the CPU.

OpenVINO reads the very ``.onnx`` file onnxruntime runs, so an export ships one file for both runtimes and
checks it in each (``openvino`` in ``manifest.json``). OpenVINO is the optional ``[openvino]`` extra.

Example:
    >>> from lightning_compress.core.onnx import onnx_bytes
    >>> net = OpenVinoNetwork(onnx_bytes(nn.Linear(4, 2), torch.randn(1, 4)))
    >>> tuple(net(torch.randn(3, 4)).shape)
    (3, 2)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_compress.core.onnx import require_packages

OPENVINO_EXTRA = "pip install 'lightning-compress[openvino]'"


def require_openvino(purpose: str) -> None:
    """Fail with one line naming the pip command when OpenVINO is missing.

    Args:
        purpose: What needs it, for the message.

    Raises:
        MissingExtraError: If ``openvino`` cannot be imported.

    Example:
        >>> require_openvino("the openvino runtime")
    """
    require_packages(("openvino",), purpose, OPENVINO_EXTRA)


class OpenVinoNetwork(nn.Module):
    """An ONNX model compiled by OpenVINO for the CPU, as an ``nn.Module``: CPU float tensors in, logits out.

    The model is compiled on first use (dynamic batch size, as exported).

    Args:
        model: The ONNX model's bytes.
        threads: OpenVINO inference threads (default: torch's thread count).

    Raises:
        MissingExtraError: Without the ``[openvino]`` extra (on first use).
    """

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.threads = threads
        self._compiled: Any = None

    def compiled(self) -> Any:
        """The compiled model (compiled on first call).

        Returns:
            OpenVINO's ``CompiledModel``.

        Raises:
            ValueError: If OpenVINO cannot read or compile the model (the message says why).
        """
        if self._compiled is None:
            require_openvino("the openvino runtime")
            import openvino

            core = openvino.Core()
            threads = self.threads or torch.get_num_threads()
            try:
                self._compiled = core.compile_model(core.read_model(self.model), "CPU",
                                                    {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1})
            except RuntimeError as err:
                raise ValueError(f"OpenVINO cannot compile the model: {str(err).strip().splitlines()[0]}") from err
        return self._compiled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        compiled = self.compiled()
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(compiled(array)[0].copy()).to(images.device)
