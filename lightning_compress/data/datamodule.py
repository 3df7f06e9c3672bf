"""``CIFARDataModule``: CIFAR-10/100 from any accepted layout, as uint8 batches augmented on the device."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from typing_extensions import override

from lightning_compress.data.augment import normalize, random_crop_flip
from lightning_compress.data.cache import default_cache_dir
from lightning_compress.data.layouts import load_cifar, prepare_cifar
from lightning_compress.data.readers import SPECS
from lightning_compress.data.sampling import ResumableShuffle, augmentation_generator, shuffle_seed

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorImageDataset(Dataset):
    """Images and labels held as two tensors; a batch of indices is fetched with one index op.

    ``with_indices`` adds each sample's index as a third element, for sample-keyed caches.

    Example:
        >>> ds = TensorImageDataset(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), torch.arange(5))
        >>> images, labels = ds.__getitems__([4, 1])
        >>> images.shape, labels.tolist(), len(ds)
        (torch.Size([2, 3, 32, 32]), [4, 1], 5)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, with_indices: bool = False) -> None:
        if len(images) != len(labels):
            raise ValueError(
                f"images and labels must have the same length, got {len(images)} and {len(labels)}"
            )
        self.images = images
        self.labels = labels
        self.with_indices = with_indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Batch:
        sample = self.images[index], self.labels[index]
        return (*sample, index) if self.with_indices else sample

    def __getitems__(self, indices: list[int]) -> Batch:
        """Fetch a whole batch; the DataLoader calls this instead of ``__getitem__`` per index."""
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = self.images.index_select(0, index), self.labels.index_select(0, index)
        return (*batch, index) if self.with_indices else batch


def keep_batch(batch: Batch) -> Batch:
    """The ``collate_fn`` for :class:`TensorImageDataset`, whose batches are already tensors."""
    return batch


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class CIFARDataModule(pl.LightningDataModule):
    """CIFAR-10/100 as uint8 tensors, batched without per-image work, augmented on the device.

    Training batches are cropped (4-pixel padding) and flipped if ``augment``, then normalized, on the
    device; other batches are only normalized. Validation is ``val_size`` training images chosen by ``seed``.

    ``seed`` also fixes the training order (per epoch) and each batch's augmentation, whatever the global
    seed, and the training loader is a torchdata ``StatefulDataLoader``: a run resumed from a checkpoint
    taken mid-epoch (``fit(ckpt_path=...)``) sees the batches, augmented the same way, that the
    uninterrupted run sees. Under DDP the loader shards itself across ranks.

    Args:
        root: torchvision's CIFAR layout, an ImageFolder tree or a tar archive of one (see
            :mod:`~lightning_compress.data.layouts`); ``download`` fetches the first if none is found.
        dataset: ``"cifar10"`` or ``"cifar100"``.
        num_workers: DataLoader worker processes (0 is usually fastest: a batch is one index op).
        cache_dir: Default ``$LIGHTNING_COMPRESS_CACHE`` or ``~/.cache/lightning_compress``.
        resize: Resize images that are not 32x32 instead of raising an error.
        eval_batch_size: Batch size for validation, test and predict; default ``batch_size``.
        with_indices: Training batches become ``(images, labels, indices)``, for sample-keyed caches
            (``KnowledgeDistillation(cache_logits=True)``, with ``augment=False``).

    Example:
        >>> dm = CIFARDataModule("data/", dataset="cifar100", download=False)
        >>> dm.num_classes, dm.mean
        (100, (0.5071, 0.4865, 0.4409))
        >>> CIFARDataModule("data/", dataset="mnist")
        Traceback (most recent call last):
        ...
        ValueError: dataset must be one of ['cifar10', 'cifar100'], got 'mnist'
    """

    def __init__(
        self,
        root: str,
        dataset: str = "cifar10",
        download: bool = True,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        resize: bool = False,
        augment: bool = True,
        eval_batch_size: int | None = None,
        with_indices: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in SPECS:
            raise ValueError(f"dataset must be one of {sorted(SPECS)}, got {dataset!r}")
        if not str(root):
            raise ValueError("root must be a non-empty path")
        _check_int("batch_size", batch_size, 1)
        _check_int("val_size", val_size, 0)
        _check_int("seed", seed, 0)
        _check_int("num_workers", num_workers, 0)
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, 1)
        for name, flag in (("download", download), ("resize", resize), ("augment", augment),
                           ("with_indices", with_indices)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.save_hyperparameters()
        self._spec = SPECS[dataset]
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.classes: list[str] = []
        self.train_set: TensorImageDataset | None = None
        self.val_set: TensorImageDataset | None = None
        self.test_set: TensorImageDataset | None = None
        # Training batches augmented so far in the current epoch: the position of the augmentation streams.
        self._augmented = {"epoch": 0, "batches": 0}

    @property
    def num_classes(self) -> int:
        """Number of classes (10 or 100)."""
        return self._spec.num_classes

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel mean of the training images, in ``[0, 1]``."""
        return self._spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel standard deviation of the training images, in ``[0, 1]``."""
        return self._spec.std

    @override
    def prepare_data(self) -> None:
        """Download, or extract and decode into the cache, once (Lightning runs it on one process)."""
        prepare_cifar(self.root, self._spec, self.hparams.download, self.cache_dir, self.hparams.resize)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load every split, whatever the ``stage``, and split train/validation the same on every rank."""
        if self.train_set is not None:
            return
        arrays = load_cifar(self.root, self._spec, self.hparams.download, self.cache_dir, self.hparams.resize)
        n_train, val_size = len(arrays.train_labels), self.hparams.val_size
        if val_size >= n_train:
            raise ValueError(f"val_size must be smaller than the {n_train} training images, got {val_size}")
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(self.hparams.seed))
        val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
        self.train_set = TensorImageDataset(
            arrays.train_images[train_idx], arrays.train_labels[train_idx], with_indices=self.hparams.with_indices
        )
        self.val_set = TensorImageDataset(arrays.train_images[val_idx], arrays.train_labels[val_idx])
        self.test_set = TensorImageDataset(arrays.test_images, arrays.test_labels)
        self.classes = arrays.classes

    @override
    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled uint8 training batches ``(images, labels)``, or ``(images, labels, indices)``, resumable."""
        train_set, trainer = _set_up(self.train_set), self.trainer
        sampler = ResumableShuffle(
            train_set,
            seed=shuffle_seed(self.hparams.seed),
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        workers = self.hparams.num_workers
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, which torch now deprecates: nothing for a user to act on.
            warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated")
            return StatefulDataLoader(
                train_set,
                batch_size=self.batch_size,
                sampler=sampler,
                num_workers=workers,
                collate_fn=keep_batch,
                persistent_workers=workers > 0,
            )

    @override
    def val_dataloader(self) -> DataLoader | list:
        """Validation batches (an empty list when ``val_size=0``, which makes Lightning skip validation)."""
        if self.hparams.val_size == 0:
            return []
        return self._eval_loader(self.val_set)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test set, for ``Trainer.predict``."""
        return self._eval_loader(self.test_set)

    def transform(
        self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Turn uint8 images into the model's input: crop + flip if ``train`` (and ``augment``), normalize.

        ``generator`` draws the crops and flips (default: torch's global generator).
        """
        if train and self.hparams.augment:
            images = random_crop_flip(images, padding=4, generator=generator)
        return normalize(images, self.mean, self.std)

    @override
    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Augment (while training) and normalize a batch already on the device."""
        images, *rest = batch
        trainer = self.trainer
        training = trainer is not None and trainer.training
        generator = self._next_augmentation() if training and self.hparams.augment else None
        return (self.transform(images, train=training, generator=generator), *rest)

    @override
    def state_dict(self) -> dict[str, Any]:
        """How many training batches of which epoch were augmented (Lightning saves it in checkpoints)."""
        return {"augmented": dict(self._augmented)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the augmentation streams where the checkpoint left them."""
        augmented = state_dict.get("augmented")
        if augmented is not None:
            self._augmented = {"epoch": int(augmented["epoch"]), "batches": int(augmented["batches"])}

    def _next_augmentation(self) -> torch.Generator:
        """The generator for the next training batch: a function of (seed, rank, epoch, batch in epoch)."""
        epoch = self.trainer.current_epoch
        if epoch != self._augmented["epoch"]:
            self._augmented = {"epoch": epoch, "batches": 0}
        batch = self._augmented["batches"]
        self._augmented["batches"] += 1
        return augmentation_generator(self.hparams.seed, self.trainer.global_rank, epoch, batch)

    def _eval_loader(self, dataset: TensorImageDataset | None) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            _set_up(dataset),
            batch_size=self.eval_batch_size,
            num_workers=workers,
            collate_fn=keep_batch,
            persistent_workers=workers > 0,
        )


def _set_up(dataset: TensorImageDataset | None) -> TensorImageDataset:
    if dataset is None:
        raise RuntimeError("call setup() before asking CIFARDataModule for a dataloader")
    return dataset
