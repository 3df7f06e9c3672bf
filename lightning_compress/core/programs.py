"""A compiled model (an ONNX file, an ExecuTorch program, an AOTInductor package) held as bytes and run by its
runtime, as an ``nn.Module``: the base of :class:`~lightning_compress.core.onnx.OnnxRuntimeNetwork`,
:class:`~lightning_compress.core.executorch.ExecuTorchNetwork` and :class:`~lightning_compress.core.aoti.AotiNetwork`.

Example:
    >>> class Echo(ProgramNetwork):
    ...     buffer_name = "echo_program"
    ...     def _load(self, program):
    ...         return lambda images: images * len(program)
    >>> Echo(b"ab")(torch.ones(1)).item()
    2.0
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn


class ProgramNetwork(nn.Module, abc.ABC):
    """A model's bytes in a ``uint8`` buffer, loaded by its runtime on first use.

    ``state_dict``, ``copy.deepcopy`` and ``torch.save`` carry the bytes (the loaded runtime object neither pickles
    nor deep-copies, and is loaded again). Inputs on another device are moved to CPU as float32 and the output is
    returned on the input's device.

    Args:
        program: The serialized model.
        quantized: Whether it computes in int8 (:attr:`quantized`).
    """

    buffer_name: ClassVar[str]
    """The buffer's name: the key of the bytes in a state dict."""

    def __init__(self, program: bytes, quantized: bool = False) -> None:
        super().__init__()
        self.register_buffer(self.buffer_name, torch.frombuffer(bytearray(program), dtype=torch.uint8))
        self.quantized = quantized
        self._loaded: Any = None

    @abc.abstractmethod
    def _load(self, program: bytes) -> Any:
        """The runtime's callable for ``program``: CPU float32 tensor in, logits out (a tensor or an array)."""

    def program_bytes(self) -> bytes:
        """The serialized model.

        Returns:
            The bytes.
        """
        return getattr(self, self.buffer_name).cpu().numpy().tobytes()

    def loaded(self) -> Any:
        """The runtime's loaded model (loaded on first call).

        Returns:
            What :meth:`_load` returned.
        """
        if self._loaded is None:
            self._loaded = self._load(self.program_bytes())
        return self._loaded

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.loaded()(images.detach().to("cpu", torch.float32).contiguous())
        return torch.as_tensor(logits).to(images.device)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_loaded"] = None
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + self.buffer_name
        if key in state_dict:  # the stored model may differ in size from the current one
            setattr(self, self.buffer_name, torch.empty_like(state_dict[key]))
            self._loaded = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
