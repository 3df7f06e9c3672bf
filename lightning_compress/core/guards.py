"""Non-finite guard: a NaN/inf while compressing stops the run, naming the step, the callback and the layer.

Callbacks check the tensors they just changed and each step's loss, so no broken model leaves fit.

Example:
    >>> check_finite({"model.fc.weight": torch.ones(2)}, step=3, callback="MagnitudePruning")
    >>> check_finite({"model.fc.weight": torch.tensor([1.0, float("nan")])}, step=3, callback="MagnitudePruning")
    Traceback (most recent call last):
    ...
    FloatingPointError: MagnitudePruning at optimizer step 3: model.fc.weight holds NaN/inf values; ...
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

_CHECKED_STEP: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
"""The last optimizer step whose loss was checked, per trainer."""


def check_finite(tensors: Mapping[str, torch.Tensor], step: int, callback: str) -> None:
    """Raise ``FloatingPointError`` if any of ``tensors`` (by name) holds a NaN or an infinity.

    One device sync for all of them; the message names ``step``, ``callback`` and the first bad tensor.
    """
    names = [name for name, tensor in tensors.items() if tensor is not None and tensor.is_floating_point()]
    if not names:
        return
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).cpu().tolist()
    for name, ok in zip(names, finite):
        if not ok:
            raise FloatingPointError(
                f"{callback} at optimizer step {step}: {name} holds NaN/inf values; the run was stopped so that "
                "no broken model leaves fit. Lower the learning rate, use precision='bf16-mixed' instead of "
                "'16-mixed', or start compression later")


def step_loss(outputs: Any) -> torch.Tensor | None:
    """The loss tensor in what ``training_step`` returned (a tensor or a dict's ``"loss"``), else ``None``."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"].detach()
    return None


def check_step_loss(trainer: Any, outputs: Any, callback: str) -> None:
    """:func:`check_finite` on the step's loss, once per step: the first callback to ask is named."""
    if _CHECKED_STEP.get(trainer) == trainer.global_step:
        return
    check_finite({"loss": step_loss(outputs)}, trainer.global_step, callback)
    _CHECKED_STEP[trainer] = trainer.global_step
