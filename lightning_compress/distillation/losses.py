"""The math of knowledge distillation: the soft-target loss, its mix with the task loss, alpha schedules.

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
    """Hinton et al.'s soft-target loss ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, a scalar.

    The KL divergence is summed over classes and averaged over the batch; ``T²`` keeps the gradient
    scale, and so the meaning of ``alpha``, independent of ``T``. Logits are ``(N, ..., C)`` of equal
    shape, computed in float32; gradients flow into ``student_logits`` only. Raises ``ValueError`` for
    different shapes or ``temperature <= 0``.

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
    """The training loss of distillation, ``(1 − alpha) · task_loss + alpha · kd_loss``.

    Returned in ``task_loss``'s dtype; ``alpha`` outside ``[0, 1]`` raises ``ValueError``.

    Example:
        >>> float(combined_loss(torch.tensor(2.0), torch.tensor(4.0), alpha=0.0))
        2.0
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return ((1.0 - alpha) * task_loss + alpha * kd_loss).to(task_loss.dtype)


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of samples on which student and teacher predict the same class, a scalar float tensor.

    Example:
        >>> student, teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> float(top1_agreement(student, teacher))
        0.5
    """
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()


def scheduled_alpha(progress: float, alpha: float, final_alpha: float, schedule: AlphaSchedule) -> float:
    """The distillation weight at ``progress`` (of the run, clamped), from ``alpha`` to ``final_alpha``.

    ``schedule`` is ``"constant"`` (always ``alpha``), ``"linear"`` or ``"cosine"`` (flat at both ends);
    another raises ``ValueError``.

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
