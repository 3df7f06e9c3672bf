"""What the network is fed: its real input, captured by a forward pre-hook, whatever the batch looks like.

Callbacks that need an example input (channel pruning traces the network, post-training
quantization calibrates it, the report counts MACs) never guess where the images are in a batch
(a tensor, a tuple, a dict, a custom object). :func:`capture_network_input` runs the module's own
``training_step`` on the batch with a forward pre-hook on the network that records the arguments the
network is called with and stops the step right there: the network's forward never runs, nothing is
logged and no gradient is computed. The random number generators are restored afterwards, so
capturing an input leaves a run bitwise identical.

Example:
    >>> import lightning.pytorch as pl
    >>> import torch
    >>> from torch import nn
    >>> class DictModule(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Linear(4, 2)
    ...     def training_step(self, batch, batch_idx):
    ...         return self.net(batch["image"] * 2).sum()
    >>> module = DictModule()
    >>> args = capture_network_input(module, module.net, {"image": torch.ones(3, 4)})
    >>> args[0].shape, float(args[0][0, 0])
    (torch.Size([3, 4]), 2.0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _InputCaptured(Exception):
    """Raised by the pre-hook to stop ``training_step`` once the network's input is known."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        super().__init__("network input captured")
        self.args = args


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def capture_network_input(pl_module: nn.Module, network: nn.Module, batch: Any, batch_idx: int = 0
                          ) -> tuple[Any, ...]:
    """The positional arguments ``network`` receives when ``pl_module`` trains on ``batch``.

    Args:
        pl_module: The LightningModule (anything with a ``training_step(batch, batch_idx)``).
        network: Its submodule whose input is wanted.
        batch: A training batch, as ``training_step`` receives it (already on the device).
        batch_idx: Passed to ``training_step``.

    Returns:
        The network's positional arguments, detached.

    Raises:
        ValueError: If ``training_step`` returns or raises without calling ``network``.
    """

    def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
        raise _InputCaptured(_detach(args))

    handle = network.register_forward_pre_hook(stop)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            pl_module.training_step(batch, batch_idx)
    except _InputCaptured as captured:
        return captured.args
    finally:
        handle.remove()
    raise ValueError(f"{type(pl_module).__name__}.training_step did not call the network "
                     f"{type(network).__name__}; pass network=<attribute> to name the submodule it calls")


def first_sample(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Cut every batched tensor in the captured arguments to its first sample (keeping the batch dim).

    Args:
        args: As returned by :func:`capture_network_input`.

    Returns:
        The same structure with tensors of batch size 1.

    Example:
        >>> first_sample((torch.zeros(8, 3), 5))[0].shape
        torch.Size([1, 3])
    """
    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value[:1]
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    return tuple(cut(value) for value in args)
