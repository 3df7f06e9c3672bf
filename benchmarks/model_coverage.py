"""Which models each callback handles: torchvision classifiers, our zoo and Lightning's demo transformer.

Every cell is one new user's attempt: a freshly built network (random weights, nothing downloaded), the
callback with its defaults plus a target, a ``Trainer.fit`` of a few optimizer steps on random data, then
``trainer.test`` (the demo transformer, which has no ``test_step``, runs a forward pass instead). A cell

* **works** when fit and test ran and the compression is there: weights zeroed (``MagnitudePruning``),
  MACs cut (``ChannelPruning``), int8 modules in place (QAT, PTQ), the distillation loss logged
  (``KnowledgeDistillation``); the compressed network is measured against the dense one (parameters,
  MACs, state-dict bytes, CPU latency at ``--batch``, interleaved);
* is **refused** when the callback raised before the first optimizer step (``trainer.global_step == 0``):
  the cell shows the message the user sees;
* **diverged** when it raised, or compressed nothing, after training and the network it left has inf/NaN
  weights or outputs in eval mode: the few random-data steps blew the network up, which no callback can check
  up front;
* **fails** otherwise -- an error after training time was spent, or a converted model that cannot run.
  The coverage contract is that no cell fails.

Image networks get ``ImageClassifier(model=<network>, num_classes=10)`` and 32x32 inputs. Linear-heavy
networks (the transformers) also get a ``quantize_dynamic`` column: the function (not a callback) run on the
trained network, int8 Linear weights with activations quantized on the fly; it raises before converting
anything or returns an int8 network, and the cell says which. Rows are written to the results files one by one, so a long run
can be read while it goes; ``--resume`` keeps the rows of an earlier run (but failures, run again) and runs only
the missing cells.

Run:
    python benchmarks/model_coverage.py                                   # every model (about an hour, 2 cores)
    python benchmarks/model_coverage.py --models resnet18 shufflenet_v2_x0_5 --techniques qat channel
Writes ``benchmarks/results/model_coverage.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.demos import transformer as demo
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import (
    ChannelPruning,
    ImageClassifier,
    KnowledgeDistillation,
    MagnitudePruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    create_model,
    list_models,
)
from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.accounting import count_macs, count_parameters, measure_latency, serialized_size
from lightning_compress.core.layers import find_network, select_weights
from lightning_compress.quantization import quantize_dynamic
from reporting import add_output_arguments, cpu_description, machine_info, run_settings, write_results

TECHNIQUES = ("magnitude", "channel", "qat", "ptq", "dynamic", "kd")
VOCAB = 1000
"""Vocabulary of the demo transformer (its default, 33278, is WikiText-2's; the size changes no outcome)."""


@dataclass(frozen=True)
class Subject:
    """A network users bring: how to build it and what it is fed.

    Args:
        group: Row group of the table (``torchvision``, ``zoo``, ``lightning demo``).
        build: Builds the LightningModule around a fresh network.
        kind: ``"image"`` (32x32 RGB, 10 classes) or ``"tokens"`` (the demo transformer).
        note: How the network was built, when not with its defaults.
        linear_heavy: Most MACs in ``nn.Linear`` (transformers): also tried with ``quantize_dynamic``.
    """

    group: str
    build: Callable[[], pl.LightningModule]
    kind: str = "image"
    note: str = ""
    linear_heavy: bool = False


def _tv(builder: Callable[..., nn.Module], **kwargs: Any) -> Callable[[], pl.LightningModule]:
    return lambda: ImageClassifier(model=builder(weights=None, num_classes=10, **kwargs), num_classes=10, lr=0.01)


def subjects() -> dict[str, Subject]:
    """Every network of the table, by row name."""
    tv = torchvision.models
    table = {
        name: Subject("torchvision", _tv(getattr(tv, name)))
        for name in ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                     "efficientnet_b0", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "regnet_x_400mf",
                     "regnet_y_400mf", "mnasnet0_5", "squeezenet1_1", "densenet121", "convnext_tiny")
    }
    table["googlenet"] = Subject("torchvision", _tv(tv.googlenet, aux_logits=False, init_weights=True),
                                 note="aux_logits=False (training mode would return the auxiliary logits too)")
    vit = dict(image_size=32, patch_size=4, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=10)
    table["vit_b_16@32"] = Subject(
        "torchvision", lambda: ImageClassifier(model=tv.VisionTransformer(**vit), num_classes=10, lr=0.01),
        note="VisionTransformer(image_size=32, patch_size=4) with vit_b_16's depth and widths", linear_heavy=True)
    table.update(_timm_subjects())
    for name in list_models():
        table[f"zoo:{name}"] = Subject("zoo", lambda name=name: ImageClassifier(name, num_classes=10, lr=0.01))
    table["LightningTransformer"] = Subject(
        "lightning demo", lambda: OfflineTransformer(vocab_size=VOCAB), kind="tokens", linear_heavy=True,
        note=f"lightning.pytorch.demos.transformer.LightningTransformer(vocab_size={VOCAB}), fed random tokens "
             "(its prepare_data, which downloads WikiText-2, is skipped)")
    return table


def _timm_subjects() -> dict[str, Subject]:
    """timm's classifiers (optional: the ``[timm]`` extra); none when timm is not installed."""
    try:
        import timm
    except ImportError:
        return {}

    def build(name: str, **kwargs: Any) -> Callable[[], pl.LightningModule]:
        return lambda: ImageClassifier(model=timm.create_model(name, pretrained=False, num_classes=10, **kwargs),
                                       num_classes=10, lr=0.01)

    table = {f"timm:{name}": Subject("timm", build(name))
             for name in ("resnet18", "efficientnet_b0", "mobilenetv3_large_100", "convnext_atto", "regnety_002",
                          "ghostnet_100")}
    table["timm:vit_tiny_patch16_224@32"] = Subject(
        "timm", build("vit_tiny_patch16_224", img_size=32, patch_size=4), linear_heavy=True,
        note="timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4)")
    return table


class OfflineTransformer(demo.LightningTransformer):
    """Lightning's demo transformer, unchanged but for ``prepare_data``: it is fed random tokens, not WikiText-2."""

    def prepare_data(self) -> None:
        """Download nothing."""


# ------------------------------------------------------------------------------------------ data
def _loader(subject: Subject, samples: int, batch: int) -> DataLoader:
    if subject.kind == "tokens":
        tokens = torch.randint(0, VOCAB, (samples, 17))
        data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    else:
        data = TensorDataset(torch.randn(samples, 3, 32, 32), torch.randint(0, 10, (samples,)))
    return DataLoader(data, batch_size=batch)


def _example(subject: Subject, batch: int) -> tuple[torch.Tensor, ...]:
    if subject.kind == "tokens":
        tokens = torch.randint(0, VOCAB, (batch, 17))
        return tokens[:, :-1], tokens[:, 1:]
    return (torch.randn(batch, 3, 32, 32),)


# ------------------------------------------------------------------------------------ callbacks
def _teacher(subject: Subject) -> nn.Module:
    """A small teacher with the student's output shape (fed the student's own inputs)."""
    if subject.kind == "tokens":
        return demo.Transformer(vocab_size=VOCAB, nlayers=1)
    return create_model("resnet20", num_classes=10)


def make_callback(technique: str, subject: Subject) -> pl.Callback | None:
    """The callback of a cell, defaults plus a target; ``None`` for dynamic int8 (a function after fit)."""
    if technique == "magnitude":
        return MagnitudePruning(final_sparsity=0.5, start=0.0, end="2steps", update_every=1)
    if technique == "channel":
        return ChannelPruning(kept_macs_ratio=0.6, start=0.0, end="2steps", update_every="1steps")
    if technique == "qat":
        return QuantizationAwareTraining(engine="x86")  # torch's int8 modules, which the cell counts
    if technique == "ptq":
        return PostTrainingQuantization(calibration_batches=2, engine="x86")
    if technique == "dynamic":
        return None
    if technique == "kd":
        return KnowledgeDistillation(_teacher(subject), temperature=4.0, alpha=0.9)
    raise ValueError(f"technique must be one of {TECHNIQUES}, got {technique!r}")


# ------------------------------------------------------------------------------------ measuring
def _latency_pair(dense: nn.Module, compressed: nn.Module, example: tuple, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"dense": [], "compressed": []}
    for _ in range(rounds):
        for key, net in (("dense", dense), ("compressed", compressed)):
            times[key].append(measure_latency(net, example, repeats=3, warmup=1))
    dense_s, compressed_s = statistics.median(times["dense"]), statistics.median(times["compressed"])
    return {"dense_ms": dense_s * 1e3, "compressed_ms": compressed_s * 1e3, "speedup": dense_s / compressed_s}


def _quantized_modules(network: nn.Module) -> int:
    return sum(type(m).__module__.startswith("torch.ao.nn.quantized") for m in network.modules())


def _evaluate(trainer: pl.Trainer, module: pl.LightningModule, subject: Subject, loader: DataLoader) -> None:
    """``trainer.test`` for image classifiers; a forward pass of the network for the demo transformer."""
    if subject.kind == "tokens":
        _forward(module, subject, loader)
        return
    trainer.test(module, loader, verbose=False)


def _finite_in_eval(module: pl.LightningModule, subject: Subject, loader: DataLoader) -> bool:
    """Whether the module's parameters are finite and its network gives finite outputs in eval mode on a batch."""
    if not all(bool(torch.isfinite(p).all()) for p in module.parameters() if p.is_floating_point()):
        return False
    try:
        return bool(torch.isfinite(_forward(module, subject, loader)).all())
    except Exception:  # noqa: BLE001 -- a network that cannot even run is not a diverged one
        return True


def _forward(module: pl.LightningModule, subject: Subject, loader: DataLoader) -> torch.Tensor:
    """The module's output on the first batch, in eval mode without gradients."""
    batch = next(iter(loader))
    inputs = batch if subject.kind == "tokens" else batch[:1]
    with torch.no_grad():
        module.eval()
        return module(*inputs)


def measure(technique: str, subject: Subject, module: pl.LightningModule, network: nn.Module, dense: nn.Module,
            args: argparse.Namespace) -> tuple[bool, str, dict[str, Any]]:
    """Whether the compression is there, a one-line summary, and the numbers behind it."""
    example = _example(subject, args.batch)
    numbers: dict[str, Any] = {}
    if technique == "kd":
        return True, "fit and test ran, distill/kd_loss logged", numbers
    if technique == "magnitude":
        names = select_weights(module)
        weights = [module.get_parameter(name) for name in names]
        zeros = sum(int((w == 0).sum()) for w in weights)
        selected = sum(w.numel() for w in weights)
        numbers = {"selected_params": selected, "zeros": zeros, "sparsity": zeros / selected,
                   "share_of_all_params": selected / count_parameters(network),
                   "attention_matrices": [n for n in names if n.endswith("_proj_weight")]}
        attention = f", {len(numbers['attention_matrices'])} attention in-projections" if numbers["attention_matrices"] else ""
        summary = (f"{numbers['sparsity']:.0%} of {numbers['share_of_all_params']:.0%} of weights zeroed{attention}")
        return abs(numbers["sparsity"] - 0.5) < 0.02, summary, numbers
    if technique == "channel":
        one = tuple(t[:1] for t in example)
        numbers = {"macs_ratio": count_macs(network, one) / count_macs(dense, one),
                   "params_ratio": count_parameters(network) / count_parameters(dense)}
        numbers["latency"] = _latency_pair(dense, network, example, args.rounds)
        summary = (f"MACs x{numbers['macs_ratio']:.2f}, params x{numbers['params_ratio']:.2f}, "
                   f"{numbers['latency']['speedup']:.2f}x faster")
        return numbers["macs_ratio"] <= 0.61, summary, numbers
    # qat, ptq (static or dynamic): an int8 network in place
    numbers = {"int8_modules": _quantized_modules(network), "fp32_bytes": serialized_size(dense.state_dict()),
               "int8_bytes": serialized_size(network.state_dict())}
    numbers["size_ratio"] = numbers["int8_bytes"] / numbers["fp32_bytes"]
    numbers["latency"] = _latency_pair(dense, network, example, args.rounds)
    summary = (f"{numbers['int8_modules']} int8 modules, size x{numbers['size_ratio']:.2f}, "
               f"{numbers['latency']['speedup']:.2f}x faster")
    return numbers["int8_modules"] > 0, summary, numbers


def run_cell(name: str, subject: Subject, technique: str, args: argparse.Namespace) -> dict[str, Any]:
    """One fit (+ test) of ``subject`` with ``technique``; the outcome as a row."""
    torch.manual_seed(0)
    row: dict[str, Any] = {"model": name, "group": subject.group, "technique": technique}
    started = time.perf_counter()
    trainer: pl.Trainer | None = None
    phase = "build"
    try:
        module = subject.build()
        attribute, network = find_network(module)
        dense = copy.deepcopy(network).eval()
        loader = _loader(subject, args.steps * args.batch, args.batch)
        callback = make_callback(technique, subject)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_test_batches=1, num_sanity_val_steps=0,
                             callbacks=[callback] if callback is not None else [])
        phase = "fit"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, loader)
        if technique == "kd" and "distill/kd_loss" not in trainer.callback_metrics:
            raise RuntimeError("KnowledgeDistillation logged no distill/kd_loss")
        if callback is None:
            phase = "quantize_dynamic"
            setattr(module, attribute, quantize_dynamic(getattr(module, attribute)))
        phase = "test"
        _evaluate(trainer, module, subject, loader)
        phase = "measure"
        network = getattr(module, attribute)
        achieved, row["summary"], row["numbers"] = measure(technique, subject, module, network, dense, args)
        row["status"] = "works" if achieved else "fails" if _finite_in_eval(module, subject, loader) else "diverged"
        said = [str(w.message) for w in caught if "failed" in str(w.message)]
        if not achieved and said:  # the callback's own account of what it did not do
            row["summary"] = f"{said[-1]} ({row['summary']})"
    except Exception as error:  # noqa: BLE001 -- every failure is an outcome of the table
        step = trainer.global_step if trainer is not None else 0
        before_training = phase == "fit" and step == 0
        nothing_converted = phase == "quantize_dynamic"  # a function: it raises, the fp32 network stays
        row["status"] = "refused" if (before_training or nothing_converted) and isinstance(error, ValueError) else "fails"
        row["summary"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        row["phase"], row["optimizer_steps_done"] = phase, step
        if row["status"] == "fails" and phase != "build" and not _finite_in_eval(module, subject, loader):
            row["status"] = "diverged"
        if row["status"] == "fails":
            row["traceback"] = traceback.format_exc(limit=-6)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


# ------------------------------------------------------------------------------------ reporting
_LABELS = {"magnitude": "MagnitudePruning", "channel": "ChannelPruning", "qat": "QuantizationAwareTraining",
           "ptq": "PostTrainingQuantization", "dynamic": "quantize_dynamic", "kd": "KnowledgeDistillation"}


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    text = row["summary"].replace("|", "\\|")
    return {"works": "works: ", "refused": "refused: ", "diverged": "diverged: ", "fails": "**FAILS**: "}[row["status"]] + text


def render(rows: list[dict[str, Any]], machine: dict[str, Any], settings: dict[str, Any],
           table: dict[str, Subject]) -> str:
    """The markdown: counts, one table per group, notes on how networks were built."""
    by_cell = {(r["model"], r["technique"]): r for r in rows}
    techniques = [t for t in TECHNIQUES if any(r["technique"] == t for r in rows)]
    counts = {status: sum(r["status"] == status for r in rows) for status in ("works", "refused", "diverged", "fails")}
    lines = [
        "# Model coverage: each callback on the networks users bring", "",
        f"{len(rows)} cells: {counts['works']} work, {counts['refused']} refused up front (before the first "
        f"optimizer step, with the message shown), {counts['diverged']} diverged (the fp32 network blew up in "
        f"the few random-data steps: inf/NaN in eval mode, not a callback failure), {counts['fails']} fail.", "",
        f"Each cell: fresh network (random weights), {settings['steps']} optimizer steps of batch "
        f"{settings['batch']} on random data (32x32 images, 10 classes; 16-token sequences for the demo "
        "transformer), then `trainer.test`. Targets: MagnitudePruning(final_sparsity=0.5), "
        "ChannelPruning(kept_macs_ratio=0.6), QAT and PTQ on the x86 engine (torch's int8 modules counted; the "
        "default engine, onnxruntime, is not covered by this table), "
        "KnowledgeDistillation with a ResNet-20 teacher (a 1-layer demo Transformer for the transformer). "
        f"Latency: CPU, batch {settings['batch']}, compressed vs dense network, median of {settings['rounds']} "
        "interleaved rounds of 3 forwards (few steps of random data: the speed of the architecture, not of a "
        "trained model).", "",
        f"Machine: {machine['cpu']['model']} ({', '.join(machine['cpu']['flags'])}), "
        f"{machine['cpu_count']} cores, torch {machine['torch']}, load {machine['load_average_1_5_15']}.", "",
    ]
    for group in dict.fromkeys(s.group for s in table.values()):
        names = [n for n, s in table.items() if s.group == group and any(r["model"] == n for r in rows)]
        if not names:
            continue
        lines += [f"## {group}", "", "| model | " + " | ".join(_LABELS[t] for t in techniques) + " |",
                  "|---" * (len(techniques) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_cell(by_cell.get((n, t))) for t in techniques) + " |" for n in names]
        lines.append("")
    notes = [f"- {n}: {s.note}" for n, s in table.items() if s.note and any(r["model"] == n for r in rows)]
    if notes:
        lines += ["How networks were built:", "", *notes, ""]
    return "\n".join(lines)


def main() -> None:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="row names (default: all)")
    parser.add_argument("--techniques", nargs="+", default=list(TECHNIQUES), choices=TECHNIQUES)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per cell")
    parser.add_argument("--batch", type=int, default=4, help="batch size of training and latency")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the results file")
    add_output_arguments(parser, "model_coverage")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # Lightning's few-batches advice, per cell
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    table = subjects()
    names = args.models or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        parser.error(f"unknown --models {unknown}; known: {list(table)}")
    path = args.results_dir / f"{args.name}.json"
    rows = json.loads(path.read_text())["results"] if args.resume and path.exists() else []
    planned = {(name, technique) for name in names for technique in args.techniques}
    rows = [r for r in rows if r["status"] != "fails" or (r["model"], r["technique"]) not in planned]  # run again
    done = {(r["model"], r["technique"]) for r in rows if r["status"] != "fails"}
    settings = run_settings(args, omit=("resume", "models", "techniques"))
    for name in names:
        for technique in args.techniques:
            if (name, technique) in done or (technique == "dynamic" and not table[name].linear_heavy):
                continue
            row = run_cell(name, table[name], technique, args)
            rows = [r for r in rows if (r["model"], r["technique"]) != (name, technique)] + [row]
            order = {n: i for i, n in enumerate(table)}
            rows.sort(key=lambda r: (order.get(r["model"], math.inf), TECHNIQUES.index(r["technique"])))
            print(f"{name:24s} {technique:10s} {row['status']:8s} {row['seconds']:6.1f}s  {row['summary']}", flush=True)
            machine = {**machine_info(), "cpu": cpu_description()}
            write_results(args.name, {"machine": machine, "settings": settings, "results": rows},
                          render(rows, machine, settings, table), directory=args.results_dir)


if __name__ == "__main__":
    main()
