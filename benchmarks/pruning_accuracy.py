"""Accuracy vs sparsity: dense ResNet-20 vs gradual magnitude pruning at 50/80/90/95 %, CIFAR-10.

Every run trains ``ImageClassifier("resnet20")`` on the shared CIFAR-10 copy for the same number of
epochs with the same seed and learning-rate schedule; pruned runs add
``MagnitudePruning(final_sparsity=s)`` (global, cubic schedule over ``[--start, --end]`` of the run),
so the pruned network reaches its sparsity and then fine-tunes inside the same budget. Test
accuracy is measured on the 10,000 test images (or ``--limit-test-batches`` of them).

Run:
    python benchmarks/pruning_accuracy.py --epochs 30                  # full budget (GPU recommended)
    python benchmarks/pruning_accuracy.py --quick                      # 1 epoch x 30 batches, CPU smoke
Writes ``benchmarks/results/pruning_accuracy.{json,md,png}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_compress.core.files import atomic_path
from lightning_compress.core.layers import select_layers
from lightning_compress.data import CIFARDataModule
from lightning_compress.module import ImageClassifier
from lightning_compress.pruning import MagnitudePruning
from reporting import SHARED_CIFAR10, add_output_arguments, machine_info, run_settings, write_results
from lightning_compress.commands.parser import CommandParser

DEFAULT_DATA = SHARED_CIFAR10


def position(text: str) -> float | str:
    """A run position from the command line: ``0.1`` (fraction), ``"2ep"`` or ``"300steps"``."""
    try:
        return float(text)
    except ValueError:
        return text


def run(sparsity: float | None, args: argparse.Namespace) -> dict[str, object]:
    """Train once (dense when ``sparsity`` is None) and return test accuracy and achieved sparsity."""
    pl.seed_everything(args.seed, verbose=False)
    data = CIFARDataModule(root=args.data, batch_size=args.batch_size, download=False, val_size=0)
    module = ImageClassifier(model="resnet20", num_classes=10, lr=args.lr, warmup=args.warmup)
    callbacks = []
    if sparsity is not None:
        callbacks.append(MagnitudePruning(final_sparsity=sparsity, start=args.start, end=args.end,
                                          update_every=args.update_every))
    trainer = pl.Trainer(max_epochs=args.epochs, limit_train_batches=args.limit_train_batches,
                         limit_test_batches=args.limit_test_batches, accelerator="auto", devices=1,
                         callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    weights = [module.get_parameter(f"{name}.weight") for name in select_layers(module)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {
        "target_sparsity": 0.0 if sparsity is None else sparsity,
        "method": "dense" if sparsity is None else "GMP",
        "test_acc": round(100 * float(test["test/acc"]), 2),
        "achieved_sparsity": round(zeros / sum(w.numel() for w in weights), 4),
        "train_seconds": round(seconds, 1),
        "optimizer_steps": trainer.global_step,
    }


def plot(rows: list[dict[str, object]], path: Path, budget: str) -> None:
    """Accuracy vs sparsity, with the dense accuracy as a horizontal reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["method"] == "dense")
    pruned = [r for r in rows if r["method"] == "GMP"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.axhline(dense["test_acc"], color="gray", linestyle="--", label=f"dense ({dense['test_acc']} %)")
    ax.plot([100 * r["achieved_sparsity"] for r in pruned], [r["test_acc"] for r in pruned], "o-",
            label="MagnitudePruning (GMP)")
    ax.set_xlabel("sparsity of pruned layers (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"ResNet-20, CIFAR-10 ({budget})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def to_markdown(result: dict[str, object], figure: str) -> str:
    """Render the result table with machine, settings and budget; ``figure`` is the plot's file name."""
    lines = [
        "# Accuracy vs sparsity (ResNet-20, CIFAR-10)",
        "",
        f"Budget: {result['budget']}",
        f"Machine: {result['machine']}",
        f"Settings: {result['settings']}",
        "",
        "| method | target sparsity | achieved sparsity | test acc (%) | delta vs dense (pts) "
        "| train time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    dense = next(r for r in result["rows"] if r["method"] == "dense")["test_acc"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['target_sparsity']:.0%} | {r['achieved_sparsity']:.2%} | "
                     f"{r['test_acc']} | "
                     f"{r['test_acc'] - dense:+.2f} | {r['train_seconds']} |")
    lines += ["", f"![accuracy vs sparsity]({figure})", "",
              "Target at a full budget (GPU): 90 % sparse within 1.5 points of dense."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = CommandParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 location (see CIFARDataModule)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--warmup", type=position, default="1ep", help="LR warm-up end (run position)")
    parser.add_argument("--start", type=position, default=0.1, help="pruning starts (run position)")
    parser.add_argument("--end", type=position, default=0.7, help="final sparsity reached (run position)")
    parser.add_argument("--update-every", type=int, default=100)
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    parser.add_argument("--limit-test-batches", type=float, default=1.0,
                        help="fraction of the test set (it is ordered by class: a part is biased)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: 1 epoch of 30 batches, update every 3 steps, full test set")
    add_output_arguments(parser, "pruning_accuracy")
    args = parser.parse_args()
    if args.quick:
        # the whole test set even here: it is ordered by class, so a part of it is biased
        args.epochs, args.limit_train_batches = 1, 30
        args.update_every, args.warmup = 3, 0.0
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    rows = []
    for sparsity in [None, *args.sparsities]:
        row = run(sparsity, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    steps = rows[0]["optimizer_steps"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = (f"{args.epochs} epoch(s), {steps} optimizer steps of batch {args.batch_size} per run "
              f"on {device}; "
              f"test on {'all' if args.limit_test_batches == 1.0 else args.limit_test_batches} test batches")
    if args.quick:
        budget += " -- QUICK smoke run: accuracies are far from converged and only show the pipeline works"
    settings = run_settings(args)
    result = {"budget": budget, "machine": machine_info(), "settings": settings, "rows": rows}
    figure = f"{args.name}.png"
    plot(rows, args.results_dir / figure, budget.split(" -- ")[0])
    write_results(args.name, result, to_markdown(result, figure), directory=args.results_dir)


if __name__ == "__main__":
    main()
