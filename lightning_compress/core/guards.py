"""Non-finite guard: a NaN/inf while compressing stops the run, naming the step, the callback and the layer.

A compression step that meets a NaN (a diverged loss, an fp16 overflow, a degenerate factorization)
would otherwise go on silently and hand back a broken model. Compression callbacks call
:func:`check_finite` on the tensors they just changed and on the loss of each step in their window.

Example:
    >>> import torch
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
    """Raise if any of ``tensors`` holds a NaN or an infinity (one device sync for all of them).

    Args:
        tensors: Tensors by name (a layer's parameter name, or ``"loss"``).
        step: The optimizer step, for the message.
        callback: The callback's name, for the message.

    Raises:
        FloatingPointError: Naming the step, the callback and the first non-finite tensor.
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
    """The loss tensor in what ``training_step`` returned (a tensor or a dict's ``"loss"``), else ``None``.

    Args:
        outputs: The ``outputs`` argument of ``on_train_batch_end``.

    Returns:
        The loss, or ``None``.

    Example:
        >>> float(step_loss({"loss": torch.tensor(2.0)}))
        2.0
    """
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"].detach()
    return None


def check_step_loss(trainer: Any, outputs: Any, callback: str) -> None:
    """:func:`check_finite` on the step's loss, once per optimizer step whichever callbacks ask.

    Several compression callbacks guard the same loss; the check costs a device sync, so the first
    callback to ask in a step checks it and names itself, the others find it done.

    Args:
        trainer: The trainer (its ``global_step`` identifies the step).
        outputs: The ``outputs`` argument of ``on_train_batch_end``.
        callback: The asking callback's name, for the message.

    Raises:
        FloatingPointError: If the loss holds NaN/inf.

    Example:
        >>> class Trainer: global_step = 3
        >>> check_step_loss(Trainer(), {"loss": torch.tensor(1.0)}, "MagnitudePruning")
    """
    if _CHECKED_STEP.get(trainer) == trainer.global_step:
        return
    check_finite({"loss": step_loss(outputs)}, trainer.global_step, callback)
    _CHECKED_STEP[trainer] = trainer.global_step
