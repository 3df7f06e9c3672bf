"""A NaN/inf while compressing stops the run naming the step, the callback and the layer."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_compress import (
    ChannelPruning,
    KnowledgeDistillation,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from tests.composition.modules import DictBatchModule, dict_loader
from tests.toy import ToyConvNet


class PoisonAt(pl.Callback):
    """Writes a NaN into one weight right after the optimizer step that reaches ``step`` (before the others act)."""

    def __init__(self, step: int, parameter: str) -> None:
        self.step, self.parameter = step, parameter

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.get_parameter(self.parameter).view(-1)[0] = float("nan")


class NanLossFrom(DictBatchModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 3 else loss


def fit(module, *callbacks):
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", callbacks=list(callbacks), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dict_loader())
    return trainer


def test_a_nan_weight_at_a_mask_update_names_step_callback_and_layer():
    with pytest.raises(FloatingPointError, match=r"MagnitudePruning at optimizer step 4: backbone\.conv1\.weight "
                                                 r"holds NaN/inf"):
        fit(DictBatchModule(), PoisonAt(4, "backbone.conv1.weight"),
            MagnitudePruning(final_sparsity=0.5, start=0.0, end="6steps", update_every=2))


def test_a_nan_loss_inside_a_window_stops_the_run():
    with pytest.raises(FloatingPointError, match=r"QuantizationAwareTraining at optimizer step 4: loss holds NaN"):
        fit(NanLossFrom(), QuantizationAwareTraining(start="2steps"))


def test_a_nan_after_a_channel_removal_names_the_layer():
    with pytest.raises(FloatingPointError, match=r"ChannelPruning at optimizer step 2: backbone\.conv2\.weight holds NaN"):
        fit(DictBatchModule(), PoisonAt(2, "backbone.conv2.weight"),
            ChannelPruning(channel_ratio=0.5, start=0.0, end="4steps", update_every=2))


def test_finite_runs_are_untouched():
    trainer = fit(DictBatchModule(), MagnitudePruning(final_sparsity=0.5, start=0.0, end="6steps", update_every=2))
    assert trainer.global_step == 8


def test_a_nan_distilled_loss_stops_the_run():
    with pytest.raises(FloatingPointError, match=r"KnowledgeDistillation at optimizer step 4: loss holds NaN"):
        fit(NanLossFrom(), KnowledgeDistillation(ToyConvNet(num_classes=4), alpha=0.5))
