"""``lightning-compress sensitivity CHECKPOINT``: per-layer pruning sensitivity on validation batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_compress.commands.checkpoint import NETWORK, load_checkpoint
from lightning_compress.commands.held_out import add_held_out_arguments, held_out_batches
from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.layers import select_weights, weight_label
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
    parser = CommandParser(
        prog="lightning-compress sensitivity",
        description="Prune one layer at a time (magnitude) at several sparsities, measure validation accuracy on a "
                    "few batches, write sensitivity.csv, sensitivity.png and pruning_targets.yaml (MagnitudePruning "
                    "arguments: per-layer final_sparsity, scope: layerwise).")
    parser.add_argument("checkpoint", help="ImageClassifier checkpoint (.ckpt)")
    add_held_out_arguments(parser)
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    parser.add_argument("--max-drop", type=float, default=0.01, help="tolerated accuracy drop per layer")
    parser.add_argument("--include", nargs="*", default=None, help="layer patterns (default: MagnitudePruning's rule)")
    parser.add_argument("--exclude", nargs="*", default=None, help="layer patterns to leave out")
    parser.add_argument("--out", default="sensitivity", help="output folder")
    args = parser.parse_args(argv)
    sparsities = check_sparsities(args.sparsities)
    if args.max_drop < 0:
        raise ValueError(f"--max-drop must be >= 0, got {args.max_drop}")
    loaded = load_checkpoint(args.checkpoint)
    batches = held_out_batches(args)
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
