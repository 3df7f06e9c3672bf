"""Channel pruning at 2x fewer MACs: params, MACs and CPU latency vs dense; accuracy behind ``--epochs``.

Each network is slimmed by the real :class:`~lightning_compress.pruning.channel.ChannelPruning`
callback inside a ``Trainer.fit``. With ``--epochs 0`` (the default) the fit is a few steps on random
CIFAR-shaped batches -- enough to reach the architecture, not to train it -- and only params, MACs
(``torch.utils.flop_counter`` via ``core.accounting``) and latency are measured. Latency of the dense
and slimmed networks is measured interleaved, round by round, in this one process.

Each model is slimmed once per ``--round-to`` value: ``1`` keeps exact channel fractions (a 16-wide
layer becomes 11 wide), ``8`` keeps multiples of 8 -- the channel block of oneDNN's AVX2 convolution
kernels, which pad 11 channels back to 16 and so gain nothing from removing them.

With ``--epochs N`` both the dense and the pruned model are trained for N epochs on CIFAR-10
(``--data``; ``--val-size`` training images held out for validation, batches of ``--batch-size``) with
the same budget, and test accuracy is reported too.

Run:
    python benchmarks/channel_pruning.py --repeats 5 --rounds 3           # structure + latency only
    python benchmarks/channel_pruning.py --epochs 30 --models resnet56    # + accuracy (long)
Writes ``benchmarks/results/channel_pruning.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import statistics

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.accounting import count_macs, count_parameters, measure_latency
from lightning_compress.module import ImageClassifier
from lightning_compress.pruning.channel import ChannelPruning
from reporting import SHARED_CIFAR10, add_output_arguments, cpu_description, machine_info, run_settings, write_results


def _trainer(callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)


def slim(name: str, kept_macs: float, epochs: int, data: pl.LightningDataModule | None,
         round_to: int = 1, limit_train_batches: float = 1.0) -> ImageClassifier:
    """A model slimmed to ``kept_macs`` of the dense MACs by ChannelPruning (trained if ``epochs``)."""
    model = ImageClassifier(name, num_classes=10, lr=0.05)
    if epochs:
        pruning = ChannelPruning(kept_macs_ratio=kept_macs, importance="l2", start=0.0, end=0.5, update_every=0.05,
                                 round_to=round_to)
        _trainer([pruning], max_epochs=epochs, limit_train_batches=limit_train_batches).fit(model, datamodule=data)
    else:
        pruning = ChannelPruning(kept_macs_ratio=kept_macs, importance="l2", start=0.0, end="3steps",
                                 update_every="1steps", schedule="linear", round_to=round_to)
        images = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
        _trainer([pruning], max_steps=4).fit(model, DataLoader(images, batch_size=8))
    return model


def latencies(nets: dict, batch: int, repeats: int, rounds: int) -> dict:
    """Median seconds per forward of every network, all interleaved round by round (order rotated each round),
    so that the dense network and every slimmed variant see the same machine load."""
    x = torch.randn(batch, 3, 32, 32)
    times: dict = {key: [] for key in nets}
    keys = list(nets)
    for round_index in range(rounds):
        for key in keys[round_index % len(keys):] + keys[:round_index % len(keys)]:
            times[key].append(measure_latency(nets[key], x, repeats=repeats, warmup=1))
    return {key: statistics.median(values) for key, values in times.items()}


def _slimmed_and_timed(args: argparse.Namespace, data: pl.LightningDataModule | None):
    """Per model: the dense network and one slimmed network per ``--round-to``, all timed in the same rounds."""
    for name in args.models:
        dense = ImageClassifier(name, num_classes=10, lr=0.05)
        variants = {r: slim(name, args.kept_macs, args.epochs, data, r, args.limit_train_batches) for r in args.round_to}
        nets = {"dense": dense.model, **{r: variant.model for r, variant in variants.items()}}
        timed = {b: latencies(nets, b, args.repeats, args.rounds) for b in args.batches}
        for round_to, pruned in variants.items():
            yield name, round_to, dense, pruned, timed


def accuracy(model: ImageClassifier, epochs: int, data: pl.LightningDataModule, train: bool,
             limit_train_batches: float = 1.0) -> float:
    trainer = _trainer([], max_epochs=epochs, limit_train_batches=limit_train_batches)
    if train:
        trainer.fit(model, datamodule=data)
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])


def main() -> None:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet56", "mobilenetv2"])
    parser.add_argument("--kept-macs", type=float, default=0.5, help="fraction of dense MACs kept (0.5 = 2x fewer)")
    parser.add_argument("--epochs", type=int, default=0, help="training budget per model; 0 skips accuracy")
    parser.add_argument("--data", default=SHARED_CIFAR10)
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size with --epochs")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--limit-train-batches", type=float, default=1.0, help="fraction of each training epoch")
    parser.add_argument("--round-to", nargs="+", type=int, default=[1, 8], help="ChannelPruning(round_to=...) values")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved dense/pruned rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_output_arguments(parser, "channel_pruning")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = None
    if args.epochs:
        from lightning_compress.data import CIFARDataModule

        data = CIFARDataModule(root=args.data, download=False, batch_size=args.batch_size,
                               val_size=args.val_size)
    rows = []
    dense_acc: dict[str, float] = {}
    for name, round_to, dense, pruned, timed in _slimmed_and_timed(args, data):
        example = torch.randn(1, 3, 32, 32)
        row = {
            "model": name,
            "round_to": round_to,
            "conv_widths": sorted({m.out_channels for m in pruned.model.modules() if isinstance(m, torch.nn.Conv2d)}),
            "params": {"dense": count_parameters(dense.model), "pruned": count_parameters(pruned.model)},
            "macs": {"dense": count_macs(dense.model, example), "pruned": count_macs(pruned.model, example)},
            "latency": [{"batch": b, "dense_ms": t["dense"] * 1e3, "pruned_ms": t[round_to] * 1e3,
                         "speedup": t["dense"] / t[round_to]} for b, t in timed.items()],
        }
        row["macs_reduction"] = row["macs"]["dense"] / row["macs"]["pruned"]
        if args.epochs:
            if name not in dense_acc:  # one dense baseline per model, whatever the round_to values
                dense_acc[name] = accuracy(dense, args.epochs, data, train=True,
                                          limit_train_batches=args.limit_train_batches)
            row["test_acc"] = {"dense": dense_acc[name], "pruned": accuracy(pruned, args.epochs, data, train=False)}
        rows.append(row)
        print(row, flush=True)
    settings = run_settings(args)
    machine = {**machine_info(), "cpu": cpu_description()}
    result = {"machine": machine, "settings": settings, "results": rows}
    lines = [
        "# Channel pruning: dense vs slimmed (ChannelPruning, L2 importance)", "",
        f"CPU: {machine['cpu']['model']}, ISA flags {machine['cpu']['flags']}; torch's CPU kernels use "
        f"{machine['cpu_capability']}.", "",
        f"Machine: {machine}", "",
        f"Settings: {settings}. Latency = median over {args.rounds} rounds, each timing the dense network and "
        f"every round_to variant in turn (order rotated), of the median of "
        f"{args.repeats} forwards, torch threads = {args.threads}. Absolute times depend on the "
        "machine's load (see load_average_1_5_15); the dense/pruned ratios, measured side by side, are the result.", "",
        "| model | round_to | params dense -> pruned | MACs dense -> pruned (reduction) | batch | dense ms | pruned ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for lat in row["latency"]:
            lines.append(
                f"| {row['model']} | {row['round_to']} | {row['params']['dense']:,} -> {row['params']['pruned']:,} | "
                f"{row['macs']['dense']/1e6:.1f}M -> {row['macs']['pruned']/1e6:.1f}M ({row['macs_reduction']:.2f}x) | "
                f"{lat['batch']} | {lat['dense_ms']:.2f} | {lat['pruned_ms']:.2f} | {lat['speedup']:.2f}x |")
    lines += ["", f"This CPU's vector ISA is {machine['cpu_capability']}: oneDNN runs convolutions on blocks of "
              "8 channels (AVX2) or 16 (AVX-512), so a layer cut to a width between blocks costs as much as the "
              "next multiple. With round_to=8 the kept widths are whole blocks; the MACs target is then met "
              "from below (the reduction can exceed 2x).", "", "Conv output widths of the slimmed networks:", ""]
    lines += [f"- {r['model']}, round_to={r['round_to']}: {r['conv_widths']}" for r in rows]
    if args.epochs:
        lines += ["", "| model | round_to | epochs | dense test acc | pruned test acc |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['round_to']} | {args.epochs} | {r['test_acc']['dense']:.4f} | "
                  f"{r['test_acc']['pruned']:.4f} |" for r in rows]
    else:
        lines += ["", "Accuracy not measured in this run (`--epochs 0`): the pruned architectures were reached "
                  "in a 4-step fit on random data."]
    write_results(args.name, result, "\n".join(lines) + "\n", directory=args.results_dir)


if __name__ == "__main__":
    main()
