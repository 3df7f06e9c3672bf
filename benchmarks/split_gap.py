"""Why does a row score differently on the validation and the test split? (issue 25: GMP 90 %)

For each checkpoint (the suite keeps one per row in ``runs/suite``): top-1 on the validation split (5,000
held-out training images), the test split, and 5,000 of the images it trained on (no augmentation);
the same after re-estimating the batch-norm statistics on augmented training batches; per-class
accuracy on both splits; and the weights' sparsity. A gap that follows the training images (train >>
val > test) is over-fitting to the training distribution; one that moves with the BN statistics is
stale normalization; one concentrated in a few classes is a class-dependent effect.

Usage::

    python benchmarks/split_gap.py runs/suite/gmp90_cpu30_*.ckpt runs/suite/qat_cpu30_*.ckpt
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from reporting import SHARED_CIFAR10, add_output_arguments, machine_info, run_settings, write_results
from torch import nn

from lightning_compress import CIFARDataModule, ImageClassifier
from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.accounting import count_nonzero
from lightning_compress.planning.widths import reestimate_norms


def predictions(network: nn.Module, data: CIFARDataModule, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Top-1 class of each image (eval mode, normalized, no augmentation)."""
    network.eval()
    with torch.no_grad():
        return torch.cat([network(data.transform(images[i:i + batch], train=False)).argmax(1)
                          for i in range(0, len(images), batch)])


def reestimate_bn(network: nn.Module, data: CIFARDataModule, batches: int, batch_size: int = 128) -> nn.Module:
    """A copy whose batch-norm statistics are the plain average over ``batches`` augmented training batches."""
    generator = torch.Generator().manual_seed(0)
    images = data.train_set.images
    inputs = [data.transform(images[torch.randint(len(images), (batch_size,), generator=generator)], train=True,
                             generator=generator) for _ in range(batches)]
    network = copy.deepcopy(network)
    reestimate_norms(network, inputs)
    return network.eval()


def split_accuracies(network: nn.Module, data: CIFARDataModule, train_images: int) -> dict[str, Any]:
    """Top-1 (%) on validation, test and training images, and per class on validation and test."""
    splits = {"val": data.val_set, "test": data.test_set}
    out: dict[str, Any] = {}
    for name, dataset in splits.items():
        correct = predictions(network, data, dataset.images) == dataset.labels
        out[name] = round(100 * correct.float().mean().item(), 2)
        out[f"{name}_per_class"] = [round(100 * correct[dataset.labels == c].float().mean().item(), 1)
                                    for c in range(len(data.classes))]
    train = data.train_set
    correct = predictions(network, data, train.images[:train_images]) == train.labels[:train_images]
    out["train"] = round(100 * correct.float().mean().item(), 2)
    return out


def measure(path: Path, data: CIFARDataModule, bn_batches: int, train_images: int) -> dict[str, Any]:
    """Every figure for one checkpoint."""
    module = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)  # data, never code
    network = module.model.float().cpu()
    counts = count_nonzero(network)
    return {"checkpoint": path.name, "sparsity": round(counts.total.sparsity, 4),
            "as_trained": split_accuracies(network, data, train_images),
            "bn_reestimated": split_accuracies(reestimate_bn(network, data, bn_batches), data, train_images)}


def trend(rows: list[dict[str, Any]]) -> list[str]:
    """How the validation - test gap moves with test top-1 across the checkpoints (least squares), as lines.

    Example:
        >>> rows = [{"as_trained": {"val": v, "test": t}} for v, t in ((84.0, 83.0), (86.0, 85.5), (88.0, 88.0))]
        >>> trend(rows)[1][:60]
        'Gap against test top-1 over these 3 checkpoints: -0.200 poin'
    """
    if len(rows) < 3:
        return []
    tests = [row["as_trained"]["test"] for row in rows]
    gaps = [row["as_trained"]["val"] - row["as_trained"]["test"] for row in rows]
    if len(set(tests)) < 2 or len(set(gaps)) < 2:
        return []
    fit = statistics.linear_regression(tests, gaps)
    return ["", f"Gap against test top-1 over these {len(rows)} checkpoints: {fit.slope:+.3f} points of gap per point of "
                f"test top-1 (Pearson r = {statistics.correlation(tests, gaps):+.2f}); the gap predicted at "
                f"{max(tests):.2f} % test top-1: {fit.intercept + fit.slope * max(tests):+.2f}, at {min(tests):.2f} %: "
                f"{fit.intercept + fit.slope * min(tests):+.2f}."]


def render(rows: list[dict[str, Any]], classes: list[str], settings: dict[str, Any], machine: dict[str, Any]) -> str:
    """The markdown report."""
    lines = ["# Validation vs test split, per checkpoint (`benchmarks/split_gap.py`)", "",
             f"Machine: {machine['cpu']['model']}, torch {machine['torch']}; settings: {settings}.", "",
             "| checkpoint | sparsity | train top-1 | val top-1 | test top-1 | val - test | BN re-estimated: val | "
             "test | val - test |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        a, b = row["as_trained"], row["bn_reestimated"]
        lines.append(f"| {row['checkpoint']} | {row['sparsity']:.1%} | {a['train']:.2f} | {a['val']:.2f} | "
                     f"{a['test']:.2f} | {a['val'] - a['test']:+.2f} | {b['val']:.2f} | {b['test']:.2f} | "
                     f"{b['val'] - b['test']:+.2f} |")
    lines += trend(rows)
    lines += ["", "Per class (as trained), validation - test, points:", "",
              "| checkpoint | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for row in rows:
        a = row["as_trained"]
        gaps = [v - t for v, t in zip(a["val_per_class"], a["test_per_class"])]
        lines.append(f"| {row['checkpoint']} | " + " | ".join(f"{g:+.1f}" for g in gaps) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", default=SHARED_CIFAR10)
    parser.add_argument("--val-size", type=int, default=5000, help="as the checkpoints were trained (the suite's)")
    parser.add_argument("--bn-batches", type=int, default=100)
    parser.add_argument("--train-images", type=int, default=5000)
    add_output_arguments(parser, "split_gap")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.checkpoints if not p.is_file()]
    if missing:
        parser.error(f"checkpoints not found: {', '.join(missing)}")
    data = CIFARDataModule(root=args.data, download=False, val_size=args.val_size)
    data.prepare_data()
    data.setup("fit")
    rows = []
    for path in args.checkpoints:
        rows.append(measure(path, data, args.bn_batches, args.train_images))
        print(f"[split_gap] {path.name}: {rows[-1]['as_trained']['val']} val, {rows[-1]['as_trained']['test']} test",
              flush=True)
    machine, settings = machine_info(), run_settings(args, omit=("checkpoints",))
    result = {"machine": machine, "settings": settings, "classes": list(data.classes), "rows": rows}
    write_results(args.name, result, render(rows, list(data.classes), settings, machine), args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
