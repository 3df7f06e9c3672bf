"""ImageClassifier: the generic CIFAR LightningModule that compression callbacks attach to.

Nothing here knows about compression: callbacks act on ``self.model`` as on a user's own module.

Example:
    >>> clf = ImageClassifier("resnet20", num_classes=10)
    >>> clf(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from typing_extensions import override

from lightning_compress.core.architecture import RestoresArchitecture
from lightning_compress.core.progress import Position, step_budget, validate_position
from lightning_compress.models import create_model

LRSchedule = Literal["cosine", "onecycle", "constant"]
_LR_SCHEDULES = ("cosine", "onecycle", "constant")


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimizer ``step``: linear warm-up to 1, then cosine decay to 0.

    Example:
        >>> [round(warmup_cosine_factor(s, 10, 110), 3) for s in (0, 5, 10, 60, 110)]
        [0.1, 0.6, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def split_weight_decay(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups (decayed, not decayed; empty ones left out): no decay below 2 dimensions.

    Example:
        >>> [len(g["params"]) for g in split_weight_decay(nn.Linear(2, 2), 5e-4)]
        [1, 1]
    """
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class ImageClassifier(RestoresArchitecture, pl.LightningModule):
    """Image classification with SGD, a warm-up + cosine/one-cycle schedule and accuracy metrics.

    Logs ``{train,val,test}/loss`` and ``/acc``, and ``{val,test}/acc_top5``. Compressed checkpoints
    load back without the callbacks (:class:`~lightning_compress.core.architecture.RestoresArchitecture`).

    Args:
        model: A zoo name (see :func:`lightning_compress.models.list_models`) or any ``nn.Module``
            mapping images to logits; a module is not saved in the hyperparameters, so pass it again
            to ``load_from_checkpoint(path, model=...)``.
        num_classes: Number of classes of a zoo model's head.
        model_kwargs: Extra constructor arguments of the zoo model (e.g. ``{"width_mult": 0.5}``).
        lr: Peak learning rate.
        weight_decay: L2 decay on Conv/Linear weights (not on biases and BatchNorm).
        lr_schedule: ``"cosine"`` (linear warm-up then cosine to 0), ``"onecycle"`` or ``"constant"``.
        warmup: Where the warm-up ends, as a run position (fraction, ``"<n>ep"`` or ``"<n>steps"``).
        label_smoothing: Label smoothing of the cross-entropy loss, in ``[0, 1)``.
    """

    def __init__(
        self,
        model: str | nn.Module = "resnet20",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        lr_schedule: LRSchedule = "cosine",
        warmup: Position = 0.0,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if lr_schedule not in _LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {_LR_SCHEDULES}, got {lr_schedule!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        validate_position(warmup, "warmup")
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.model = create_model(model, num_classes=num_classes, **(model_kwargs or {}))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = {"acc": torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro")}
        if num_classes > 5:
            metrics["acc_top5"] = torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.val_metrics = torchmetrics.MetricCollection(metrics, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, num_classes)`` logits for a batch of normalized ``(N, 3, H, W)`` images."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    @override
    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = self.criterion(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == labels).float().mean())
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, ...], stage: str, metrics: torchmetrics.MetricCollection) -> None:
        images, labels = batch[0], batch[1]
        logits = self(images)
        self.log(f"{stage}/loss", self.criterion(logits, labels), sync_dist=True)
        metrics.update(logits, labels)
        self.log_dict(metrics, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    @override
    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities; ``batch`` is images or a tuple whose first element is images."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(images), dim=1)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            split_weight_decay(self.model, hp.weight_decay),
            lr=hp.lr,
            momentum=hp.momentum,
            nesterov=hp.nesterov and hp.momentum > 0,
        )
        budget = step_budget(self.trainer)
        warmup_steps = budget.resolve(hp.warmup, "warmup")
        if hp.lr_schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=hp.lr,
                total_steps=max(budget.total_steps, 1),
                pct_start=max(warmup_steps / max(budget.total_steps, 1), 1e-3),
            )
        elif hp.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda step: warmup_cosine_factor(step, warmup_steps, budget.total_steps),
            )
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
