"""The training order and the augmentation resume from saved state: ResumableShuffle inside torchdata's
StatefulDataLoader, and CIFARDataModule's augmentation counter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_compress.data.sampling import ResumableShuffle, derive_seed
from tests.data.cifar_fakes import write_cifar_pickles
from tests.data.test_datamodule import make


@pytest.fixture
def pickles(tmp_path):
    write_cifar_pickles(tmp_path / "data", per_batch=8, n_test=4)  # 40 train images, 30 after validation
    return tmp_path / "data"


def labels_of(batches) -> list[int]:
    return [int(y) for _, y in batches for y in y]


def epoch(loader, number: int, batches: int | None = None) -> list:
    loader.sampler.set_epoch(number)
    out = []
    for batch in loader:
        out.append(batch)
        if batches is not None and len(out) == batches:
            break
    return out


def test_a_loader_restored_mid_epoch_serves_the_rest_of_that_epoch(pickles):
    dm = make(pickles, batch_size=4, val_size=10)
    uninterrupted = dm.train_dataloader()
    first, second = labels_of(epoch(uninterrupted, 0)), labels_of(epoch(uninterrupted, 1))
    assert sorted(first) == sorted(second) and first != second  # a new order every epoch

    killed = dm.train_dataloader()
    head = epoch(killed, 1, batches=2)
    state = killed.state_dict()
    assert state["_sampler_iter_state"]["sampler_state"] == {"epoch": 1, "yielded": 8}
    resumed = make(pickles, batch_size=4, val_size=10).train_dataloader()  # a new process
    resumed.load_state_dict(state)
    assert labels_of(head) + labels_of(epoch(resumed, 1)) == second


def test_a_position_saved_at_the_end_of_an_epoch_is_not_carried_into_the_next(pickles):
    """Lightning restores a last-batch checkpoint into the next epoch, calling ``set_epoch`` after the restore."""
    dm = make(pickles, batch_size=4, val_size=10)
    killed = dm.train_dataloader()
    epoch(killed, 0, batches=5)  # limit_train_batches=5: the epoch ends before the loader does
    resumed = dm.train_dataloader()
    resumed.load_state_dict(killed.state_dict())
    assert labels_of(epoch(resumed, 1)) == labels_of(epoch(dm.train_dataloader(), 1))


def test_worker_processes_resume_mid_epoch_too(pickles):
    """With workers the first indices are drawn when the iterator is made: before Lightning's ``set_epoch``."""
    dm = make(pickles, batch_size=4, val_size=10, num_workers=1)
    second = labels_of(epoch(dm.train_dataloader(), 1))
    killed = dm.train_dataloader()
    head = epoch(killed, 1, batches=2)
    resumed = make(pickles, batch_size=4, val_size=10, num_workers=1).train_dataloader()
    resumed.load_state_dict(killed.state_dict())
    rest = iter(resumed)
    resumed.sampler.set_epoch(1)
    assert labels_of(head) + labels_of(rest) == second


def test_shuffle_state_is_checked_and_ranks_share_one_permutation():
    with pytest.raises(ValueError, match="ResumableShuffle state must have 'epoch' and 'yielded', got"):
        ResumableShuffle(range(4), seed=0).load_state_dict({"yielded": 2})
    ranks = [list(ResumableShuffle(range(10), seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    assert derive_seed(3, 1) != derive_seed(3, 2) and derive_seed(3, 1) != derive_seed(4, 1)


def training(epoch: int) -> SimpleNamespace:
    return SimpleNamespace(training=True, current_epoch=epoch, global_rank=0, world_size=1)


def test_augmentation_is_drawn_per_batch_and_resumes_from_the_datamodule_state(pickles):
    dm = make(pickles)
    batch = (dm.train_set.images[:8], dm.train_set.labels[:8])
    dm.trainer = training(0)
    first, second = dm.on_after_batch_transfer(batch, 0)[0], dm.on_after_batch_transfer(batch, 0)[0]
    assert not torch.equal(first, second)

    restarted = make(pickles)  # a resumed process: same seed, state from the checkpoint
    restarted.trainer = training(0)
    restarted.load_state_dict({"augmented": {"epoch": 0, "batches": 1}})
    assert torch.equal(restarted.on_after_batch_transfer(batch, 0)[0], second)
    assert dm.state_dict() == restarted.state_dict() == {"augmented": {"epoch": 0, "batches": 2}}

    dm.trainer = restarted.trainer = training(1)  # a new epoch starts the count again
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], restarted.on_after_batch_transfer(batch, 0)[0])
    assert dm.state_dict() == {"augmented": {"epoch": 1, "batches": 1}}
    other_seed = make(pickles, seed=1)
    other_seed.trainer = training(1)
    assert not torch.equal(other_seed.on_after_batch_transfer(batch, 0)[0], first)
