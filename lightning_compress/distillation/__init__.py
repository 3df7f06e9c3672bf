"""Knowledge distillation: a frozen teacher's soft targets added to any LightningModule's loss.

``losses`` holds the math, ``teacher`` turns a module/checkpoint/zoo name into a frozen teacher,
``callback`` holds :class:`KnowledgeDistillation` (the training-step wrapper and the logit cache).
"""

from lightning_compress.distillation.callback import IndexedDataset, KnowledgeDistillation, TeacherLogitCache
from lightning_compress.distillation.losses import (
    combined_loss,
    distillation_loss,
    scheduled_alpha,
    top1_agreement,
)
from lightning_compress.distillation.teacher import FrozenTeacher, load_teacher

__all__ = [
    "FrozenTeacher",
    "IndexedDataset",
    "KnowledgeDistillation",
    "TeacherLogitCache",
    "combined_loss",
    "distillation_loss",
    "load_teacher",
    "scheduled_alpha",
    "top1_agreement",
]
