"""Validation batches for the commands that measure a checkpoint on held-out images (``sensitivity``, ``plan``).

The split is the one training held out: ``CIFARDataModule`` with the same ``--val-size`` and ``--seed``.
"""

from __future__ import annotations

import argparse

import torch

from lightning_compress.data import CIFARDataModule


def add_held_out_arguments(parser: argparse.ArgumentParser, batches: int = 4) -> None:
    """Add ``--data-root``, ``--dataset``, ``--cache-dir``, ``--val-size``, ``--seed``, ``--batch-size``, ``--batches``."""
    parser.add_argument("--data-root", required=True, help="CIFARDataModule root (see its layouts)")
    parser.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    parser.add_argument("--cache-dir", default=None, help="CIFARDataModule cache folder")
    parser.add_argument("--val-size", type=int, default=5000, help="validation images held out (as in training)")
    parser.add_argument("--seed", type=int, default=0, help="validation split seed (as in training)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=batches, help="validation batches per measurement")


def held_out_batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``args.batches`` validation batches, normalized as in evaluation: ``[(images, labels), ...]``.

    Raises:
        ValueError: If ``--batches`` < 1 or ``--val-size`` is 0 (naming the argument).
    """
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    if args.val_size == 0:
        raise ValueError("--val-size must be > 0: the measurement runs on the validation split")
    data = CIFARDataModule(args.data_root, dataset=args.dataset, download=False, batch_size=args.batch_size,
                           val_size=args.val_size, seed=args.seed, cache_dir=args.cache_dir)
    data.setup("validate")
    batches = []
    for images, labels in data.val_dataloader():
        batches.append((data.transform(images, train=False), labels))
        if len(batches) == args.batches:
            break
    return batches
