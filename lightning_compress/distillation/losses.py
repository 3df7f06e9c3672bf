"""The math of knowledge distillation: the soft-target loss, its mix with the task loss, alpha schedules.

Pure functions of tensors and numbers (no Lightning): the callback in
:mod:`lightning_compress.distillation.callback` only decides when to call them and what to log.

Example:
    >>> import torch
    >>> student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    >>> float(distillation_loss(student, teacher, temperature=4.0))
    0.0
    >>> float(combined_loss(torch.tensor(1.0), torch.tensor(3.0), alpha=0.75))
    2.5
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

AlphaSchedule = Literal["constant", "linear", "cosine"]
ALPHA_SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al.'s soft-target loss ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``.

    The KL divergence is summed over classes and averaged over the batch ("batchmean", the
    mathematically correct reduction); the ``T²`` factor keeps the gradient scale independent of the
    temperature, so ``alpha`` means the same thing at every ``T``. Computed in float32 whatever the
    logits' dtype (a bf16 teacher gives bf16 logits). Gradients flow into ``student_logits`` only.

    Args:
        student_logits: ``(N, C)`` (or ``(N, ..., C)``) logits of the student.
        teacher_logits: Teacher logits of the same shape.
        temperature: Softening temperature ``T > 0``.

    Returns:
        The scalar loss.

    Raises:
        ValueError: If the shapes differ or ``temperature <= 0``.

    Example:
        >>> s = torch.tensor([[1.0, 0.0, 0.0]]); t = torch.tensor([[0.0, 1.0, 0.0]])
        >>> round(float(distillation_loss(s, t, temperature=1.0)), 4)
        0.3642
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher logits shape {tuple(teacher_logits.shape)} != student logits shape "
            f"{tuple(student_logits.shape)}"
        )
    classes = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float().reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def combined_loss(task_loss: torch.Tensor, kd_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """The training loss of distillation: ``(1 − alpha) · task_loss + alpha · kd_loss``.

    Args:
        task_loss: The loss the module computes on the labels.
        kd_loss: The distillation loss (see :func:`distillation_loss`).
        alpha: Weight of the distillation term, in ``[0, 1]``.

    Returns:
        The mixed loss, in the dtype of ``task_loss``.

    Raises:
        ValueError: If ``alpha`` is outside ``[0, 1]``.

    Example:
        >>> float(combined_loss(torch.tensor(2.0), torch.tensor(4.0), alpha=0.0))
        2.0
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return ((1.0 - alpha) * task_loss + alpha * kd_loss).to(task_loss.dtype)


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of samples on which student and teacher predict the same class.

    Args:
        student_logits: ``(N, C)`` student logits.
        teacher_logits: ``(N, C)`` teacher logits.

    Returns:
        A scalar float tensor in ``[0, 1]``.

    Example:
        >>> student, teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> float(top1_agreement(student, teacher))
        0.5
    """
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()


def scheduled_alpha(progress: float, alpha: float, final_alpha: float, schedule: AlphaSchedule) -> float:
    """The distillation weight at a point of the run, moving from ``alpha`` to ``final_alpha``.

    Args:
        progress: Fraction of the run done, clamped to ``[0, 1]``.
        alpha: Weight at the start of the run.
        final_alpha: Weight at the end of the run.
        schedule: ``"constant"`` (always ``alpha``), ``"linear"`` or ``"cosine"`` (half-cosine, flat
            at both ends).

    Returns:
        The weight for this point of the run.

    Raises:
        ValueError: If ``schedule`` is unknown.

    Example:
        >>> [scheduled_alpha(p, 0.9, 0.1, "linear") for p in (0.0, 0.5, 1.0)]
        [0.9, 0.5, 0.1]
        >>> round(scheduled_alpha(0.5, 1.0, 0.0, "cosine"), 6)
        0.5
    """
    progress = min(1.0, max(0.0, progress))
    if schedule == "constant":
        return alpha
    if schedule == "linear":
        weight = progress
    elif schedule == "cosine":
        weight = 0.5 * (1.0 - math.cos(math.pi * progress))
    else:
        raise ValueError(f"alpha_schedule must be one of {ALPHA_SCHEDULES}, got {schedule!r}")
    return round(alpha + (final_alpha - alpha) * weight, 12)
