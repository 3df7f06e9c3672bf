"""Channel pruning at 2x fewer MACs: params, MACs and CPU latency vs dense; accuracy behind ``--epochs``.

Each network is slimmed by the real :class:`~lightning_compress.pruning.channel.ChannelPruning`
callback inside a ``Trainer.fit``. With ``--epochs 0`` (the default) the fit is a few steps on random
CIFAR-shaped batches -- enough to reach the architecture, not to train it -- and only params, MACs
(``torch.utils.flop_counter`` via ``core.accounting``) and latency are measured. Latency of the dense
and slimmed networks is measured interleaved, round by round, in this one process.

With ``--epochs N`` both the dense and the pruned model are trained for N epochs on CIFAR-10
(``--data``) with the same budget, and test accuracy is reported too.

Run:
    python benchmarks/channel_pruning.py --repeats 5 --rounds 3           # structure + latency only
    python benchmarks/channel_pruning.py --epochs 30 --models resnet56    # + accuracy (long)
Writes ``benchmarks/results/channel_pruning.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.core.accounting import count_macs, count_parameters, measure_latency
from lightning_compress.module import ImageClassifier
from lightning_compress.pruning.channel import ChannelPruning
from reporting import SHARED_CIFAR10, machine_info, write_results


def _trainer(callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)


def slim(name: str, kept_macs: float, epochs: int, data: pl.LightningDataModule | None) -> ImageClassifier:
    """A model slimmed to ``kept_macs`` of the dense MACs by ChannelPruning (trained if ``epochs``)."""
    model = ImageClassifier(name, num_classes=10, lr=0.05)
    if epochs:
        pruning = ChannelPruning(kept_macs_ratio=kept_macs, importance="l2", start=0.0, end=0.5, update_every="1ep")
        _trainer([pruning], max_epochs=epochs).fit(model, datamodule=data)
    else:
        pruning = ChannelPruning(kept_macs_ratio=kept_macs, importance="l2", start=0.0, end="3steps",
                                 update_every="1steps", schedule="linear")
        images = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
        _trainer([pruning], max_steps=4).fit(model, DataLoader(images, batch_size=8))
    return model


def latency(dense: torch.nn.Module, pruned: torch.nn.Module, batch: int, repeats: int, rounds: int) -> dict:
    """Median seconds per forward of both models, interleaved round by round."""
    x = torch.randn(batch, 3, 32, 32)
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    for _ in range(rounds):
        for key, net in (("dense", dense), ("pruned", pruned)):
            times[key].append(measure_latency(net, x, repeats=repeats, warmup=1))
    dense_s, pruned_s = statistics.median(times["dense"]), statistics.median(times["pruned"])
    return {"batch": batch, "dense_ms": dense_s * 1e3, "pruned_ms": pruned_s * 1e3, "speedup": dense_s / pruned_s}


def accuracy(model: ImageClassifier, epochs: int, data: pl.LightningDataModule, train: bool) -> float:
    trainer = _trainer([], max_epochs=epochs)
    if train:
        trainer.fit(model, datamodule=data)
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet56", "mobilenetv2"])
    parser.add_argument("--kept-macs", type=float, default=0.5, help="fraction of dense MACs kept (0.5 = 2x fewer)")
    parser.add_argument("--epochs", type=int, default=0, help="training budget per model; 0 skips accuracy")
    parser.add_argument("--data", default=SHARED_CIFAR10)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved dense/pruned rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = None
    if args.epochs:
        from lightning_compress.data import CIFARDataModule

        data = CIFARDataModule(root=args.data, download=False)
    rows = []
    for name in args.models:
        dense = ImageClassifier(name, num_classes=10, lr=0.05)
        pruned = slim(name, args.kept_macs, args.epochs, data)
        example = torch.randn(1, 3, 32, 32)
        row = {
            "model": name,
            "params": {"dense": count_parameters(dense.model), "pruned": count_parameters(pruned.model)},
            "macs": {"dense": count_macs(dense.model, example), "pruned": count_macs(pruned.model, example)},
            "latency": [latency(dense.model, pruned.model, b, args.repeats, args.rounds) for b in args.batches],
        }
        row["macs_reduction"] = row["macs"]["dense"] / row["macs"]["pruned"]
        if args.epochs:
            row["test_acc"] = {"dense": accuracy(dense, args.epochs, data, train=True),
                               "pruned": accuracy(pruned, args.epochs, data, train=False)}
        rows.append(row)
        print(row, flush=True)
    settings = {k: v for k, v in vars(args).items()}
    machine = machine_info()
    result = {"machine": machine, "settings": settings, "results": rows}
    lines = [
        "# Channel pruning: dense vs slimmed (ChannelPruning, L2 importance)", "",
        f"Machine: {machine}", "",
        f"Settings: {settings}. Latency = median over {args.rounds} interleaved rounds of the median of "
        f"{args.repeats} forwards, torch threads = {args.threads}. Absolute times depend on the "
        "machine's load (see load_average_1_5_15); the dense/pruned ratios, measured side by side, are the result.", "",
        "| model | params dense -> pruned | MACs dense -> pruned (reduction) | batch | dense ms | pruned ms | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for lat in row["latency"]:
            lines.append(
                f"| {row['model']} | {row['params']['dense']:,} -> {row['params']['pruned']:,} | "
                f"{row['macs']['dense']/1e6:.1f}M -> {row['macs']['pruned']/1e6:.1f}M ({row['macs_reduction']:.2f}x) | "
                f"{lat['batch']} | {lat['dense_ms']:.2f} | {lat['pruned_ms']:.2f} | {lat['speedup']:.2f}x |")
    if args.epochs:
        lines += ["", "| model | epochs | dense test acc | pruned test acc |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {args.epochs} | {r['test_acc']['dense']:.4f} | {r['test_acc']['pruned']:.4f} |"
                  for r in rows]
    else:
        lines += ["", "Accuracy not measured in this run (`--epochs 0`): the pruned architectures were reached "
                  "in a 4-step fit on random data."]
    write_results("channel_pruning", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
