"""``CIFARDataModule``: CIFAR-10/100 from any accepted layout, as uint8 batches augmented on the device."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_compress.data.augment import normalize, random_crop_flip
from lightning_compress.data.cache import default_cache_dir
from lightning_compress.data.layouts import load_cifar, prepare_cifar
from lightning_compress.data.readers import SPECS

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
    def train_dataloader(self) -> DataLoader:
        """Shuffled uint8 training batches ``(images, labels)``, or ``(images, labels, indices)``."""
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader | list:
        """Validation batches (an empty list when ``val_size=0``, which makes Lightning skip validation)."""
        if self.hparams.val_size == 0:
            return []
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test set, for ``Trainer.predict``."""
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def transform(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """Turn uint8 images into the model's input: crop + flip if ``train`` (and ``augment``), normalize."""
        if train and self.hparams.augment:
            images = random_crop_flip(images, padding=4)
        return normalize(images, self.mean, self.std)

    @override
    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Augment (while training) and normalize a batch already on the device."""
        images, *rest = batch
        training = self.trainer is not None and self.trainer.training
        return (self.transform(images, train=training), *rest)

    def _loader(self, dataset: TensorImageDataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking CIFARDataModule for a dataloader")
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            collate_fn=keep_batch,
            persistent_workers=workers > 0,
        )
