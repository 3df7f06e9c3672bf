"""``lightning-compress sensitivity CHECKPOINT``: per-layer pruning sensitivity on validation batches."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import nn

from lightning_compress.commands.checkpoint import NETWORK, load_checkpoint
from lightning_compress.core.layers import select_weights, weight_label
from lightning_compress.data import CIFARDataModule
from lightning_compress.sensitivity import (
    DEFAULT_SPARSITIES,
    check_sparsities,
    layer_sensitivity,
    sensitivity_targets,
    write_sensitivity,
)


def main(argv: Sequence[str]) -> int:
    """Prune each layer alone at several sparsities, write CSV + PNG and MagnitudePruning targets.

    Args:
        argv: Command-line arguments after ``sensitivity``.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-compress sensitivity",
        description="Prune one layer at a time (magnitude) at several sparsities, measure validation accuracy on a "
                    "few batches, write sensitivity.csv, sensitivity.png and pruning_targets.yaml (MagnitudePruning "
                    "arguments: per-layer final_sparsity, scope: layerwise).")
    parser.add_argument("checkpoint", help="ImageClassifier checkpoint (.ckpt)")
    parser.add_argument("--data-root", required=True, help="CIFARDataModule root (see its layouts)")
    parser.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    parser.add_argument("--cache-dir", default=None, help="CIFARDataModule cache folder")
    parser.add_argument("--val-size", type=int, default=5000, help="validation images held out (as in training)")
    parser.add_argument("--seed", type=int, default=0, help="validation split seed (as in training)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4, help="validation batches per measurement")
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    parser.add_argument("--max-drop", type=float, default=0.01, help="tolerated accuracy drop per layer")
    parser.add_argument("--include", nargs="*", default=None, help="layer patterns (default: MagnitudePruning's rule)")
    parser.add_argument("--exclude", nargs="*", default=None, help="layer patterns to leave out")
    parser.add_argument("--out", default="sensitivity", help="output folder")
    args = parser.parse_args(argv)
    sparsities = check_sparsities(args.sparsities)
    if args.max_drop < 0:
        raise ValueError(f"--max-drop must be >= 0, got {args.max_drop}")
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    loaded = load_checkpoint(args.checkpoint)
    data = CIFARDataModule(args.data_root, dataset=args.dataset, download=False, batch_size=args.batch_size,
                           val_size=args.val_size, seed=args.seed, cache_dir=args.cache_dir)
    data.setup("validate")
    if args.val_size == 0:
        raise ValueError("--val-size must be > 0: sensitivity is measured on the validation split")
    batches = []
    for images, labels in data.val_dataloader():
        batches.append((data.transform(images, train=False), labels))
        if len(batches) == args.batches:
            break
    holder = nn.Module()  # names layers as in the LightningModule ("model.layer1.0.conv1")
    holder.add_module(NETWORK, loaded.network)

    @torch.no_grad()
    def evaluate(module: nn.Module) -> float:
        correct = sum(int((module.get_submodule(NETWORK)(x).argmax(1) == y).sum()) for x, y in batches)
        return correct / sum(len(y) for _, y in batches)

    layers = [weight_label(name) for name in select_weights(holder, args.include, args.exclude)]
    rows = layer_sensitivity(holder, evaluate, layers, sparsities)
    targets = sensitivity_targets(rows, args.max_drop)
    paths = write_sensitivity(rows, targets, args.out, args.max_drop, {"include": args.include, "exclude": args.exclude})
    print(f"baseline accuracy on {sum(len(y) for _, y in batches)} validation images: {rows[0]['accuracy']:.4f}")
    for layer, target in targets.items():
        print(f"{layer}: {target:g}")
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0
