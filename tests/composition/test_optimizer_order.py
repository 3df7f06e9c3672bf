"""A resumed fit gives the saved optimizer state to the right parameters, also when the architecture replay
registers them in another order (QAT preparation of ResNet-20 moves the shortcut convolutions)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import ImageClassifier, QuantizationAwareTraining
from lightning_compress.core.optimizer_order import ORDER_KEY
from tests.toy import random_loader


class _Stopped(Exception):
    pass


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Stopped  # the process dies here; only the checkpoints on disk go on


def _fit(tmp_path, stop_at=None, ckpt_path=None):
    pl.seed_everything(0)
    model = ImageClassifier("resnet20", num_classes=4, lr=0.05)
    callbacks = [QuantizationAwareTraining(start=0.25, convert_on_fit_end=False),
                 ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    if stop_at is not None:
        callbacks.append(StopAt(stop_at))
    trainer = pl.Trainer(max_epochs=2, limit_val_batches=0, accelerator="cpu", callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(model, random_loader(96, batch_size=16), ckpt_path=ckpt_path)
    return model


def test_resume_inside_the_qat_window_is_bitwise_equal(tmp_path):
    uninterrupted = _fit(tmp_path / "full")
    with pytest.raises(_Stopped):
        _fit(tmp_path / "resumed", stop_at=7)  # the epoch-0 checkpoint holds QAT-prepared weights and momentum
    checkpoint = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    saved = [name for group in checkpoint[ORDER_KEY][0] for name in group]
    assert len(saved) == len(set(saved)) and all(name.startswith("model.") for name in saved)
    resumed = _fit(tmp_path / "resumed", ckpt_path=tmp_path / "resumed" / "last.ckpt")
    full, again = uninterrupted.state_dict(), resumed.state_dict()
    assert full.keys() == again.keys()
    assert [k for k in full if not torch.equal(full[k], again[k])] == []
