"""CompressToTarget under DDP: rank 0 plans, both ranks remove the same channels and keep training in sync."""

import pytest
import torch

from tests.ddp import run_two_ranks, run_two_ranks_launched_externally

BODY = """
from tests.toy import UserClassifier, random_loader
from lightning_compress import CompressToTarget

target = CompressToTarget(macs_ratio=0.5, start=0.0, end=0.5, update_every="2steps", round_to=4)
model = UserClassifier()
trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=2,
                     callbacks=[target], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, random_loader(n=64, batch_size=8, shuffle=True), random_loader(n=32, batch_size=8, seed=1))
save(model.state_dict(), trainer)
"""


@pytest.mark.slow
def test_ddp_ranks_carry_out_rank_zeros_plan_in_sync(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, BODY)
    assert sum(rank0[f"net.{name}.weight"].shape[0] for name in ("stem", "conv1", "conv2")) < 8 + 16 + 16
    for name, tensor in rank0.items():
        assert tensor.shape == rank1[name].shape, name
        if "running" not in name and "num_batches" not in name:  # BN statistics are per rank in DDP
            assert torch.equal(tensor, rank1[name]), name


UNREACHABLE = """
from tests.toy import UserClassifier, random_loader
from lightning_compress import CompressToTarget
from lightning_compress.planning import UnreachableTargetError

target = CompressToTarget(macs_ratio=0.01, start=0.0, end=0.5, update_every="2steps", round_to=4)
trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=1, callbacks=[target], logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
try:
    trainer.fit(UserClassifier(), random_loader(n=64, batch_size=8, shuffle=True))
    refusal = "not refused"
except UnreachableTargetError as err:
    refusal = str(err)
save({"refusal": refusal, "step": trainer.global_step}, trainer)
"""


@pytest.mark.slow
def test_ddp_every_rank_refuses_an_unreachable_target(tmp_path):
    # started as torchrun would: a rank left waiting in a collective would hang until the timeout
    rank0, rank1 = run_two_ranks_launched_externally(tmp_path, UNREACHABLE)
    assert rank0 == rank1
    assert rank0["step"] == 0 and "macs_ratio=0.01 cannot be reached" in rank0["refusal"]
