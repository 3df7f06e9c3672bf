"""CIFARDataModule: validation split, whole-batch loading, DDP sharding and the device-side transform."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DistributedSampler

from lightning_compress.data import CIFARDataModule
from lightning_compress.data.augment import normalize
from lightning_compress.data.datamodule import TensorImageDataset
from tests.data.cifar_fakes import write_cifar_pickles
from tests.toy import UserClassifier


@pytest.fixture
def pickles(tmp_path):
    write_cifar_pickles(tmp_path / "data", per_batch=8, n_test=12)  # 40 train images
    return tmp_path / "data"


def make(root, **kw) -> CIFARDataModule:
    dm = CIFARDataModule(str(root), **{"download": False, "batch_size": 8, "val_size": 10, **kw})
    dm.setup("fit")
    return dm


def rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(image.flatten().tolist()) for image in images}


def test_val_split_is_deterministic_disjoint_and_complete(pickles):
    dm = make(pickles, seed=1)
    again = make(pickles, seed=1)
    other = make(pickles, seed=2)
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10 and len(dm.test_set) == 12
    assert torch.equal(dm.val_set.images, again.val_set.images)
    assert torch.equal(dm.val_set.labels, again.val_set.labels)
    assert not torch.equal(dm.val_set.images, other.val_set.images)
    train, val = rows(dm.train_set.images), rows(dm.val_set.images)
    assert len(train) == 30 and not train & val
    assert train | val == rows(make(pickles, val_size=0).train_set.images)


def test_a_training_batch_is_one_index_operation(pickles, monkeypatch):
    dm = make(pickles)

    def per_image(self, index):
        raise AssertionError("per-image __getitem__ used")

    monkeypatch.setattr(TensorImageDataset, "__getitem__", per_image)
    batches = list(dm.train_dataloader())
    assert [len(x) for x, _ in batches] == [8, 8, 8, 6]
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and labels.dtype == torch.int64
    assert rows(torch.cat([x for x, _ in batches])) == rows(dm.train_set.images)
    assert [len(x) for x, _ in make(pickles, eval_batch_size=4).val_dataloader()] == [4, 4, 2]


def test_predict_dataloader_is_the_test_set_in_order(pickles):
    dm = make(pickles)
    images = torch.cat([x for x, _ in dm.predict_dataloader()])
    assert torch.equal(images, dm.test_set.images)


def test_two_ddp_ranks_see_disjoint_training_samples(pickles):
    """Each rank's loader shards itself; being a DistributedSampler, Lightning keeps it instead of replacing it."""
    seen = []
    for rank in range(2):
        dm = make(pickles)  # each rank builds its own DataModule: the split must agree
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)
        seen.append(rows(torch.cat([x for x, _ in loader])))
    assert len(seen[0]) == len(seen[1]) == 15
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == rows(make(pickles).train_set.images)


def test_transform_train_augments_and_eval_only_normalizes(pickles):
    dm = make(pickles)
    images = dm.train_set.images[:16]
    eval_out = dm.transform(images, train=False)
    assert eval_out.dtype == torch.float32 and eval_out.shape == (16, 3, 32, 32)
    assert torch.equal(eval_out, dm.transform(images, train=False))
    torch.testing.assert_close(eval_out, normalize(images, dm.mean, dm.std))
    first, second = dm.transform(images, train=True), dm.transform(images, train=True)
    assert first.dtype == torch.float32 and first.shape == (16, 3, 32, 32)
    assert not torch.equal(first, second) and not torch.equal(first, eval_out)
    plain = make(pickles, augment=False)
    assert torch.equal(plain.transform(images, train=True), eval_out)


class RecordBatches(pl.Callback):
    def __init__(self):
        self.train, self.val, self.test = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.test.append(batch)


def trainer(tmp_path, callback, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
        **kw,
    )


def test_fit_and_test_receive_augmented_and_normalized_float_batches(pickles, tmp_path):
    dm = CIFARDataModule(str(pickles), download=False, batch_size=8, val_size=10)
    record = RecordBatches()
    run = trainer(tmp_path, record, max_epochs=1, limit_val_batches=1, num_sanity_val_steps=0)
    model = UserClassifier(num_classes=dm.num_classes)
    run.fit(model, datamodule=dm)
    run.test(model, datamodule=dm, verbose=False)
    assert len(record.train) == 4 and len(record.val) == 1 and len(record.test) == 2
    for images, labels in record.train:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert labels.dtype == torch.int64
    val_images, _ = record.val[0]
    assert torch.equal(val_images, normalize(dm.val_set.images[:8], dm.mean, dm.std))
    test_images = torch.cat([x for x, _ in record.test])
    assert torch.equal(test_images, normalize(dm.test_set.images, dm.mean, dm.std))
    # Training batches are augmented: only the rare centre crop without flip (1 in 162) is unchanged.
    originals = normalize(dm.train_set.images, dm.mean, dm.std)
    seen = torch.cat([x for x, _ in record.train])
    unchanged = sum(any(torch.equal(image, original) for original in originals) for image in seen)
    assert len(seen) == 30 and unchanged <= 3


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
def test_val_size_zero_skips_validation(pickles, tmp_path):
    dm = CIFARDataModule(str(pickles), download=False, batch_size=8, val_size=0)
    record = RecordBatches()
    trainer(tmp_path, record, max_steps=2).fit(UserClassifier(num_classes=10), datamodule=dm)
    assert len(record.train) == 2 and record.val == []


def test_worker_processes_deliver_the_same_batches(pickles):
    dm = make(pickles, num_workers=1)
    torch.manual_seed(0)
    with_workers = list(dm.val_dataloader())
    without = list(make(pickles).val_dataloader())
    assert len(with_workers) == len(without) == 2
    for (x1, y1), (x2, y2) in zip(with_workers, without):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)



def test_with_indices_adds_the_training_sample_index(pickles):
    dm = make(pickles, with_indices=True, augment=False, batch_size=8)
    images, labels, indices = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(images, dm.train_set.images[indices])
    torch.testing.assert_close(labels, dm.train_set.labels[indices])
    transformed = dm.on_after_batch_transfer((images, labels, indices), 0)
    assert len(transformed) == 3 and transformed[2] is indices and transformed[0].dtype == torch.float32
    assert len(next(iter(dm.val_dataloader()))) == 2  # evaluation batches stay (images, labels)


def test_kd_logit_cache_works_with_the_datamodule(pickles):
    from lightning_compress import ImageClassifier, KnowledgeDistillation

    teacher = ImageClassifier("resnet20", num_classes=10).model
    kd = KnowledgeDistillation(teacher=teacher, cache_logits=True)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[kd],
                         limit_val_batches=0)
    dm = make(pickles, with_indices=True, augment=False, batch_size=16)
    trainer.fit(ImageClassifier("resnet20", num_classes=10), dm)
    steps_per_epoch = trainer.global_step // 2
    assert len(calls) == steps_per_epoch + 1  # first epoch fills the cache; one check forward in epoch 2
