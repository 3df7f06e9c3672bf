"""The whole set of callbacks under ``16-mixed`` (real fp16 autocast) on a CUDA device. Run with ``-m gpu``."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_compress.report import is_int8
from tests.composition.modules import DictBatchModule, dict_loader
from tests.composition.test_matrix import TECHNIQUES, make_callbacks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_whole_set_trains_on_cuda_and_tests_int8_on_cpu(precision):
    module = DictBatchModule()
    trainer = pl.Trainer(max_steps=8, accelerator="cuda", devices=1, precision=precision,
                         callbacks=make_callbacks(TECHNIQUES), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False)
    trainer.fit(module, dict_loader())
    assert trainer.global_step == 8
    assert torch.isfinite(trainer.callback_metrics["distill/kd_loss"])
    assert is_int8(module.backbone)  # converted at fit end, moved to CPU where int8 kernels run
    tester = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert 0.0 <= tester.test(module, dict_loader(), verbose=False)[0]["test_acc"] <= 1.0
