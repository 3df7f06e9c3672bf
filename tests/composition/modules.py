"""A user's LightningModule whose batches are dicts and whose network is called ``backbone``.

It opts into architecture restoring with the one documented line: ``RestoresArchitecture`` first in its bases.
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_compress.core.architecture import RestoresArchitecture
from tests.toy import ToyConvNet, random_images


class DictImages(Dataset):
    """:func:`tests.toy.random_images` as ``{"image": x, "label": y}`` samples."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        self.data = random_images(n, seed=seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.data[index]
        return {"image": image, "label": label}


class ResumableDataLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: Lightning saves its ``state_dict`` in every checkpoint.

    What a user does for exact mid-epoch resumes (or uses torchdata's ``StatefulDataLoader``): without
    it Lightning warns that a checkpoint taken mid-epoch restarts the epoch's data.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._served = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self._served += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["served"]


def dict_loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    """Batches of ``{"image": (B, 3, 16, 16), "label": (B,)}``, resumable mid-epoch."""
    return ResumableDataLoader(DictImages(n), batch_size=batch_size)


class DictBatchModule(RestoresArchitecture, pl.LightningModule):
    """Plain SGD classification on dict batches; logs ``train_loss`` and ``test_acc``."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.backbone = ToyConvNet(num_classes=4)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.backbone(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        self.log("test_acc", (self.backbone(batch["image"]).argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def same_entry(value, saved) -> bool:
    """Equal state-dict entries: tensors element for element, extra state (a PT2E graph's) by value."""
    return torch.equal(value, saved) if isinstance(value, torch.Tensor) else value == saved


class KillAt(pl.Callback):
    """SIGKILL this process when optimizer step ``step`` starts (its checkpoint is on disk by then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
