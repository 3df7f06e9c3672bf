"""Low-rank factorization vs channel pruning at the same MACs: params, MACs, CPU latency, accuracy.

For each model, a dense network is trained briefly on CIFAR-10 (``--pretrain-steps``), then each
variant starts from those same weights and fine-tunes for the same ``--finetune-steps`` with its
callback in the Trainer:

* ``dense`` -- no callback (the reference at the same total budget);
* ``tucker2`` / ``spatial`` / ``depthwise_separable`` -- ``LowRankFactorization(kept_macs_ratio=k,
  method=..., round_to=8)``, factorized at the first fine-tuning step;
* ``channel`` -- ``ChannelPruning(kept_macs_ratio=k, importance="l2", round_to=8)``, channels removed
  over the first half of the fine-tuning.

for every ``k`` in ``--kept-macs`` (0.5 = 2x fewer MACs, 0.333 = 3x). Test accuracy is measured on
the a seeded random ``--test-size`` images of the CIFAR-10 test set. Then every network's CPU latency is
measured interleaved, round by round, in this one process: torch eager and onnxruntime fp32 (the
network exported with ``torch.onnx.export(dynamo=True)``), at each of ``--batches``.

The budgets are deliberately tiny (the CPU is shared): accuracies are far below converged ones and
compare the variants' starting points of recovery, not their final accuracy.

Run:
    python benchmarks/factorization.py                       # ResNet-20 and ResNet-56, 2x and 3x
Writes ``benchmarks/results/factorization.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from lightning_compress import ChannelPruning, LowRankFactorization
from lightning_compress.core.accounting import count_macs, count_parameters, measure_latency
from lightning_compress.data import CIFARDataModule
from lightning_compress.data.datamodule import TensorImageDataset
from lightning_compress.module import ImageClassifier
from reporting import SHARED_CIFAR10, add_output_arguments, cpu_description, machine_info, run_settings, write_results
from lightning_compress.commands.parser import CommandParser

METHODS = ("tucker2", "spatial", "depthwise_separable")


def _trainer(callbacks: list, steps: int) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                      max_steps=steps, max_epochs=-1, num_sanity_val_steps=0, limit_val_batches=0)


def _callbacks(variant: str, kept: float | None, steps: int) -> list:
    if variant == "dense":
        return []
    if variant == "channel":  # removals every 10 % of the fine-tuning, over its first half
        return [ChannelPruning(kept_macs_ratio=kept, importance="l2", start=0.0, end=0.5,
                               update_every=max(1, steps // 10), round_to=8)]
    return [LowRankFactorization(kept_macs_ratio=kept, method=variant, round_to=8)]


def _test_accuracy(model: ImageClassifier, data: CIFARDataModule) -> float:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])


def random_test_subset(data: CIFARDataModule, size: int) -> None:
    """Keep a seeded random ``size`` of the test set (the archive's test set is ordered by class)."""
    data.prepare_data()
    data.setup("test")
    keep = torch.randperm(len(data.test_set), generator=torch.Generator().manual_seed(0))[:size].sort().values
    data.test_set = TensorImageDataset(data.test_set.images[keep], data.test_set.labels[keep])


class OnnxNetwork:
    """An onnxruntime CPU session over a network exported with a dynamic batch dimension, called like a module."""

    def __init__(self, network: nn.Module, threads: int) -> None:
        import onnxruntime

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(network.eval(), (torch.randn(2, 3, 32, 32),), dynamo=True, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        check = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            difference = np.abs(self(check) - network(check).numpy()).max()
        assert difference < 1e-3, f"onnxruntime disagrees with torch by {difference}"

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input: images.numpy()})[0]


def _onnx_latency(session: OnnxNetwork, images: torch.Tensor, repeats: int) -> float:
    session(images)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        session(images)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def latencies(networks: dict[str, nn.Module], batches: list[int], repeats: int, rounds: int,
              threads: int) -> dict[str, dict[str, float]]:
    """Median ms per forward of every network (eager and onnxruntime, every batch), interleaved round by round."""
    sessions = {key: OnnxNetwork(net, threads) for key, net in networks.items()}
    times: dict[str, dict[str, list[float]]] = {key: {} for key in networks}
    for _ in range(rounds):
        for key, net in networks.items():
            for batch in batches:
                images = torch.randn(batch, 3, 32, 32)
                times[key].setdefault(f"eager_b{batch}", []).append(measure_latency(net, images, repeats, warmup=1))
                times[key].setdefault(f"onnx_b{batch}", []).append(_onnx_latency(sessions[key], images, repeats))
    return {key: {k: statistics.median(v) * 1e3 for k, v in runs.items()} for key, runs in times.items()}


def _variants(args: argparse.Namespace) -> list[tuple[str, float | None]]:
    return [("dense", None)] + [(v, k) for k in args.kept_macs for v in (*args.methods, "channel")]


def _key(variant: str, kept: float | None) -> str:
    return variant if kept is None else f"{variant}@{kept:g}"


def run_model(name: str, args: argparse.Namespace, data: CIFARDataModule) -> list[dict]:
    """Pre-train ``name`` briefly, fine-tune every variant from it, measure all of them."""
    torch.manual_seed(0)
    pretrained = ImageClassifier(name, num_classes=10, lr=args.lr, warmup=0.1)
    began = time.perf_counter()
    _trainer([], args.pretrain_steps).fit(pretrained, datamodule=data)
    print(f"{name}: pre-trained {args.pretrain_steps} steps in {time.perf_counter() - began:.0f} s", flush=True)
    weights = copy.deepcopy(pretrained.state_dict())
    example = torch.randn(1, 3, 32, 32)
    dense_macs = count_macs(pretrained.model, example)
    rows, networks = [], {}
    for variant, kept in _variants(args):
        torch.manual_seed(1)
        model = ImageClassifier(name, num_classes=10, lr=args.finetune_lr)
        model.load_state_dict(weights)
        callbacks = _callbacks(variant, kept, args.finetune_steps)
        began = time.perf_counter()
        _trainer(callbacks, args.finetune_steps).fit(model, datamodule=data)
        seconds = time.perf_counter() - began
        key = _key(variant, kept)
        networks[key] = model.model.eval()
        macs = count_macs(model.model, example)
        rows.append({
            "model": name, "variant": variant, "kept_macs_target": kept, "params": count_parameters(model.model),
            "macs": macs, "macs_ratio": macs / dense_macs, "test_acc": _test_accuracy(model, data),
            "finetune_s": seconds,
            "ranks": ({n: r for n, (_, r) in callbacks[0].factorized.items()}
                      if variant in METHODS else None),
        })
        print(rows[-1], flush=True)
    timing = latencies(networks, args.batches, args.repeats, args.rounds, args.threads)
    for row in rows:
        row["latency_ms"] = timing[_key(row["variant"], row["kept_macs_target"])]
        row["speedup"] = {k: timing["dense"][k] / v for k, v in row["latency_ms"].items()}
    return rows


def _verdicts(rows: list[dict], batches: list[int]) -> list[str]:
    """Which variant is fastest (each runtime, each batch) and most accurate, per model and MACs target."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for kept in dict.fromkeys(r["kept_macs_target"] for r in rows if r["kept_macs_target"] is not None):
            group = [r for r in rows if r["model"] == model and r["kept_macs_target"] == kept]
            fastest = []
            for runtime in ("eager", "onnx"):
                for batch in batches:
                    best = max(group, key=lambda r: r["speedup"][f"{runtime}_b{batch}"])
                    fastest.append(f"{runtime} b{batch}: {best['variant']} {best['speedup'][f'{runtime}_b{batch}']:.2f}x")
            accurate = max(group, key=lambda r: r["test_acc"])
            channel = next(r for r in group if r["variant"] == "channel")
            lines.append(f"- **{model}, {1 / kept:.0f}x fewer MACs** -- fastest vs dense: {'; '.join(fastest)}. Most "
                         f"accurate: {accurate['variant']} ({accurate['test_acc']:.4f}; channel pruning "
                         f"{channel['test_acc']:.4f}).")
    return lines


def render(rows: list[dict], machine: dict, settings: dict, args: argparse.Namespace) -> str:
    """The markdown report."""
    columns = [f"{runtime} b{batch}" for runtime in ("eager", "onnx") for batch in args.batches]
    lines = [
        "# Low-rank factorization vs channel pruning at the same MACs", "",
        (f"CPU: {machine['cpu']['model']}, ISA flags {machine['cpu']['flags']}; torch's CPU kernels use "
         f"{machine['cpu_capability']}; {args.threads} threads for torch and onnxruntime."), "",
        f"Machine: {machine}", "",
        f"Settings: {settings}.", "",
        (f"**Budget (tiny, shared CPU):** each model pre-trained {args.pretrain_steps} steps of {args.batch_size} images "
        f"({args.pretrain_steps * args.batch_size / (50000 - args.val_size):.2f} epoch), then every variant fine-tuned "
        f"{args.finetune_steps} steps ({args.finetune_steps * args.batch_size / (50000 - args.val_size):.2f} epoch) "
        f"from those weights; test accuracy on a seeded random {args.test_size} of the 10,000 test images (standard "
        f"error about {100 * (0.25 / args.test_size) ** 0.5:.1f} points). Accuracies are far from converged: "
        "they compare how much each variant lost at the switch and recovered in a few steps."), "",
        ("Latency: median over rounds (interleaved across all variants) of the median of "
         f"{args.repeats} forwards, in ms; speed-up = dense / variant at the same runtime and batch. The machine's "
         "load (load_average_1_5_15) moves absolute times; the ratios measured side by side are the result."), "",
        "| model | variant | MACs target | params | MACs (ratio) | test acc | " + " | ".join(
            f"{c} ms (speed-up)" for c in columns) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for r in rows:
        target = "-" if r["kept_macs_target"] is None else f"{1 / r['kept_macs_target']:.0f}x fewer"
        cells = [f"{r['latency_ms'][c.replace(' ', '_')]:.2f} ({r['speedup'][c.replace(' ', '_')]:.2f}x)"
                 for c in columns]
        lines.append(f"| {r['model']} | {r['variant']} | {target} | {r['params']:,} | {r['macs'] / 1e6:.1f}M "
                     f"({r['macs_ratio']:.3f}) | {r['test_acc']:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "## Which method wins where (this run)", "", *_verdicts(rows, args.batches), ""]
    return "\n".join(lines)


def main() -> None:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--kept-macs", nargs="+", type=float, default=[0.5, 1 / 3],
                        help="fractions of dense MACs kept (0.5 = 2x fewer)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--data", default=SHARED_CIFAR10)
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out (unused for testing)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1, help="pre-training peak LR")
    parser.add_argument("--finetune-lr", type=float, default=0.02, help="fine-tuning peak LR (cosine to 0)")
    parser.add_argument("--test-size", type=int, default=2000, help="test images (a seeded random subset)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64], help="latency batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all variants")
    parser.add_argument("--threads", type=int, default=2)
    add_output_arguments(parser, "factorization")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = CIFARDataModule(root=args.data, download=False, batch_size=args.batch_size, val_size=args.val_size,
                           eval_batch_size=256)
    random_test_subset(data, args.test_size)
    rows = [row for name in args.models for row in run_model(name, args, data)]
    settings = run_settings(args)
    machine = {**machine_info(), "cpu": cpu_description()}
    result = {"machine": machine, "settings": settings, "results": rows}
    write_results(args.name, result, render(rows, machine, settings, args), directory=args.results_dir)


if __name__ == "__main__":
    main()
