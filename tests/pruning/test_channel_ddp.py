"""ChannelPruning under DDP: two CPU processes (gloo) remove the same channels and keep training in sync."""

import pytest
import torch

from tests.ddp import run_two_ranks

BODY = """
from tests.toy import UserClassifier, random_loader
from lightning_compress import ChannelPruning

pruning = ChannelPruning(channel_ratio=0.5, start=0.0, end=0.5, update_every="2steps")
model = UserClassifier()
trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=2,
                     callbacks=[pruning], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, random_loader(n=64, batch_size=8, shuffle=True))
save(model.state_dict(), trainer)
"""


@pytest.mark.slow
def test_ddp_ranks_remove_the_same_channels_and_stay_in_sync(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, BODY)
    assert rank0["net.conv1.weight"].shape[0] == 8  # half of conv1's 16 filters removed
    for name, tensor in rank0.items():
        assert tensor.shape == rank1[name].shape, name
        if "running" not in name and "num_batches" not in name:  # BN statistics are per rank in DDP
            assert torch.equal(tensor, rank1[name]), name  # DDP kept averaging gradients after the surgery
