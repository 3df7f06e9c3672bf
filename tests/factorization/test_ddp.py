"""LowRankFactorization under DDP: two CPU processes (gloo) factorize alike and keep training in sync."""

import pytest
import torch

from tests.ddp import run_two_ranks

BODY = """
from tests.toy import UserClassifier, random_loader
from lightning_compress import LowRankFactorization

factorization = LowRankFactorization(kept_macs_ratio=0.5, method="tucker2", start="2steps")
model = UserClassifier()
trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=2,
                     callbacks=[factorization], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, random_loader(n=64, batch_size=8, shuffle=True))
save(model.state_dict(), trainer)
"""


@pytest.mark.slow
def test_ddp_ranks_factorize_alike_and_stay_in_sync(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, BODY)
    assert "net.conv2.1.weight" in rank0 and "net.conv2.weight" not in rank0
    assert rank0.keys() == rank1.keys()
    for name, tensor in rank0.items():
        if "running" not in name and "num_batches" not in name:  # BN statistics are per rank in DDP
            assert torch.equal(tensor, rank1[name]), name  # DDP kept averaging gradients after the swap
