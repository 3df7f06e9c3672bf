"""Observers of every engine family: filling them on calibration batches, pausing them while evaluating.

torch.ao's and torchao's fake-quantizers both observe in eval mode too; evaluation data must not move
the ranges a network trains and ships with. Both expose ``observer_enabled`` with
``disable_observer()``/``enable_observer()``, so one pair of functions serves FX and PT2E graphs.

Example:
    >>> import torch
    >>> from torch.ao.quantization import FakeQuantize
    >>> net = torch.nn.Sequential(FakeQuantize())
    >>> paused = pause_observers(net); bool(net[0].observer_enabled[0])
    False
    >>> resume_observers(paused); bool(net[0].observer_enabled[0])
    True
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def calibrate(prepared: nn.Module, batches: Iterable[tuple]) -> int:
    """Run ``prepared`` (eval mode, no grad) on batches of positional inputs to fill its observers.

    Args:
        prepared: A network prepared for static quantization (FX or PT2E).
        batches: Iterable of input tuples, e.g. ``[(images,), ...]``.

    Returns:
        The number of batches seen.
    """
    seen = 0
    prepared.eval()
    with torch.no_grad():
        for inputs in batches:
            prepared(*inputs)
            seen += 1
    return seen


def pause_observers(prepared: nn.Module) -> list[nn.Module]:
    """Stop the fake-quantizers whose observers are on.

    Args:
        prepared: A network prepared for quantization (FX or PT2E).

    Returns:
        The fake-quantizers paused, for :func:`resume_observers`.
    """
    paused = [m for m in prepared.modules() if hasattr(m, "observer_enabled") and hasattr(m, "disable_observer")
              and bool(m.observer_enabled[0])]
    for module in paused:
        module.disable_observer()
    return paused


def resume_observers(paused: list[nn.Module]) -> None:
    """Turn back on the observers :func:`pause_observers` stopped."""
    for module in paused:
        module.enable_observer()
