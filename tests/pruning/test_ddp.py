"""MagnitudePruning under DDP: two CPU processes (gloo) must end with identical masks and weights."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_compress.pruning import MagnitudePruning
from lightning_compress.pruning.masks import pack_mask, unpack_mask
from tests.ddp import run_two_ranks
from tests.toy import UserClassifier, random_loader

BODY = """
from tests.toy import UserClassifier, random_loader
from lightning_compress.pruning import MagnitudePruning

pruning = MagnitudePruning(final_sparsity=0.75, end=0.5, update_every=2)
seen = []

class Record(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seen.append({n: m.clone() for n, m in pruning.masks.items()})

model = UserClassifier()
trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=2,
                     callbacks=[pruning, Record()], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, random_loader(n=64, batch_size=8, shuffle=True))
save({"masks": seen, "weights": model.state_dict()}, trainer)
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_have_identical_masks(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, BODY)
    # 64 samples / 2 ranks / batch 8 = 4 steps per epoch, 2 epochs
    assert len(rank0["masks"]) == len(rank1["masks"]) == 8
    for masks0, masks1 in zip(rank0["masks"], rank1["masks"]):
        assert masks0.keys() == masks1.keys() == {"net.conv1.weight", "net.conv2.weight"}
        assert all(torch.equal(masks0[n], masks1[n]) for n in masks0)
    for name, weight in rank0["weights"].items():
        if "running" not in name and "num_batches" not in name:  # BN statistics are per rank in DDP
            assert torch.equal(weight, rank1["weights"][name]), name
    zeros = sum(int((~m).sum()) for m in rank0["masks"][-1].values())
    assert zeros == round(0.75 * 3456)


class TwoRanksRankZeroElsewhere(SingleDeviceStrategy):
    """Pretends to be rank 1 of 2 whose rank 0 computed other masks: "prune the first entries"."""

    broadcasts = 0

    @property
    def world_size(self) -> int:
        return 2

    @world_size.setter
    def world_size(self, value: int) -> None:  # SingleDeviceStrategy assigns 1 in __init__
        pass

    def broadcast(self, obj, src=0):
        if not isinstance(obj, dict):  # Lightning's own broadcasts (paths, flags)
            return obj
        assert src == 0
        self.broadcasts += 1
        rank0 = {}
        for name, packed in obj.items():
            numel = packed.numel() * 8  # ToyConvNet weights are multiples of 8
            pruned = numel - int(unpack_mask(packed, (numel,)).sum())
            rank0[name] = pack_mask(torch.arange(numel) >= pruned)
        return rank0


def test_every_rank_adopts_rank_zero_masks():
    """Fast stand-in for the DDP test: the masks each rank installs are the ones rank 0 broadcasts."""
    strategy = TwoRanksRankZeroElsewhere(device="cpu")
    pruning = MagnitudePruning(final_sparsity=0.5, end=0.5, update_every=2)
    model = UserClassifier()
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=2, callbacks=[pruning],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, random_loader())
    assert strategy.broadcasts == 3  # updates at steps 0, 2, 4
    total = 0
    for name in ("net.conv1.weight", "net.conv2.weight"):
        weight = model.get_parameter(name).reshape(-1)
        pruned = int((weight == 0).sum())
        assert (weight[:pruned] == 0).all() and pruned > 0  # rank 0's "first entries" pattern, not magnitudes
        total += pruned
    assert total == round(0.5 * 3456)
