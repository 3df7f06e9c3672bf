"""Knowledge distillation: a frozen teacher's soft targets added to any LightningModule's loss."""

from lightning_compress.distillation.cache import IndexedDataset, TeacherLogitCache
from lightning_compress.distillation.callback import KnowledgeDistillation
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
