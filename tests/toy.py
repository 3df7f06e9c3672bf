"""Tiny models, data and a user-written LightningModule shared by the tests.

``UserClassifier`` stands for "any LightningModule a user already has": it is deliberately not
``ImageClassifier`` and names its network ``net``, not ``model``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ToyConvNet(nn.Module):
    """A 3-conv CIFAR-shaped network (stem, two body convs with BN, classifier), ~5k params."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class UserClassifier(pl.LightningModule):
    """A plain user LightningModule: SGD, cross-entropy, logs ``train_loss`` and ``val_loss``."""

    def __init__(self, num_classes: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = ToyConvNet(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def random_images(n: int = 64, num_classes: int = 4, size: int = 16, seed: int = 0) -> TensorDataset:
    """A learnable random dataset: the label is encoded in the mean of one colour channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    x[:, 0] += (y.float() - num_classes / 2).view(-1, 1, 1)
    return TensorDataset(x, y)


def random_loader(n: int = 64, batch_size: int = 16, shuffle: bool = False, seed: int = 0, **kw) -> DataLoader:
    """A DataLoader over :func:`random_images` (no workers: fast start-up in tests)."""
    return DataLoader(random_images(n, seed=seed, **kw), batch_size=batch_size, shuffle=shuffle)


def channels_dear(network, inputs, space, round_to, importance="l1"):
    """A stand-in for ``planning.widths.width_sensitivity`` where every cut is dear (each group's cut fraction), so
    that a plan with ``factorize=True`` factorizes (a random network's plan keeps no factorization otherwise):
    ``monkeypatch.setattr(lightning_compress.planning.target, "width_sensitivity", channels_dear)``.
    """
    return {group: {width: 1 - width / dense for width in space.candidates(group, round_to)}
            for group, dense in space.widths.items()}
