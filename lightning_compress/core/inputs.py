"""What the network is fed: its real input, captured by a forward pre-hook, whatever the batch looks like.

:func:`capture_network_input` runs the module's own ``training_step`` and stops it when the network
is called: nothing is logged, no gradient computed, and the random generators are restored.

Example:
    >>> import lightning.pytorch as pl
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
    """Stops ``training_step`` once the network's input is known."""

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
    """The positional arguments (detached) ``network`` receives when ``pl_module`` trains on ``batch``.

    ``batch`` is as ``training_step`` receives it, on the device. Raises ``ValueError`` if
    ``training_step`` returns or raises without calling ``network``.
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
    """Cut every batched tensor in captured arguments to its first sample (keeping the batch dim).

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
