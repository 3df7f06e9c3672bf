"""fp32 vs int8 (FX; x86 and onednn engines) on CPU: latency ratio, serialized size ratio, accuracy.

Latency: for each model and batch size, four variants are called in turn in one process after
warm-up (fp32 eager, fp32 TorchScript traced + frozen, int8 eager, int8 artifact written by
``save_quantized`` and read back by ``load_quantized``), and ratios of medians are reported, so
load from other processes on a shared machine hits all alike. The headline speed-up is fp32 eager
vs the int8 artifact (what a deployment runs; checked to compute exactly what the int8 model
does); fp32 TorchScript vs the int8 artifact compares the two compiled the same way. The int8
model for latency/size is a static-PTQ conversion calibrated on random data: same kernels and
size as a QAT-converted one.

Engines (``--engines``): ``x86`` runs fbgemm's int8 kernels, ``onednn`` oneDNN's; each int8 model
is converted for its engine and timed with that engine selected.

Size: the int8 artifact (the ``save_quantized`` file: frozen TorchScript, deflated) vs the fp32
model's ``torch.save(state_dict)`` file (the headline ratio), vs an fp32 TorchScript file written
the same way (traced, frozen, deflated), and ``torch.save(state_dict)`` of both models. The
latency section's models have random weights; the accuracy section also reports the sizes of the
trained models.

Accuracy (``--accuracy-epochs N``, off by default): on the shared CIFAR-10 copy (``--data-root``;
its training split less ``--val-size`` held-out images), fp32 trained N epochs; PTQ of that fp32
model calibrated on 32 training batches (for each engine); QAT runs of the same N epochs, one
per ``--qat-starts`` position: ``0`` fake-quantizes from the first step, ``0.75`` trains fp32 for
three quarters of the run and fine-tunes with QAT for the last quarter (observers frozen at 0.95,
BN at 0.9); each is converted to int8 and saved with ``save_quantized``; all are evaluated on the
test set on CPU.

Run:  python benchmarks/quantization.py --quick            (small repeat counts)
      python benchmarks/quantization.py --accuracy-epochs 30 --models resnet20 mobilenetv2
      python benchmarks/quantization.py --quick --models resnet20 --accuracy-epochs 2 --qat-starts 0 0.75
Writes ``benchmarks/results/quantization.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from reporting import SHARED_CIFAR10, add_output_arguments, machine_info, run_settings, write_results
from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.accounting import serialized_size
from lightning_compress.core.files import write_zip_deflated
from lightning_compress.quantization import (
    QuantizationAwareTraining,
    load_quantized,
    quantize_static,
    save_quantized,
)

MODELS = ("resnet20", "resnet56", "mobilenetv2", "resnet18")


VARIANTS = ("fp32", "fp32_ts", "int8", "int8_ts")
"""Timed side by side: fp32 eager, fp32 TorchScript (traced + frozen: Conv-BN folded), int8 eager
(the FX ``GraphModule`` that ``convert`` returns) and the int8 artifact (``save_quantized`` file loaded
back with ``load_quantized``: what a deployment runs)."""


def _interleaved_latency(models: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    with torch.no_grad():
        for _ in range(warmup):
            for model in models.values():
                model(x)
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _save_fp32_torchscript(fp32, path: Path):
    """fp32 counterpart of the int8 artifact: traced, frozen (Conv-BN folded), written deflated."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        scripted = torch.jit.freeze(torch.jit.trace(fp32.eval(), (torch.randn(1, 3, 32, 32),)).eval())
        torch.jit.save(scripted, buffer)
    write_zip_deflated(buffer.getvalue(), path)
    return scripted


def _deployed(fp32, int8, engine: str, workdir: Path) -> tuple[dict, dict]:
    """fp32 TorchScript and the int8 artifact round-tripped through its file; bytes of both files."""
    fp32_ts = _save_fp32_torchscript(fp32, workdir / "fp32_ts.pt")
    save_quantized(int8, workdir / "int8_ts.pt", (torch.randn(1, 3, 32, 32),), engine)
    int8_ts = load_quantized(workdir / "int8_ts.pt")
    sizes = {name: (workdir / f"{name}.pt").stat().st_size for name in ("fp32_ts", "int8_ts")}
    return {"fp32_ts": fp32_ts, "int8_ts": int8_ts}, sizes


def _file_bytes(save, model, *args) -> int:
    """Bytes of the file that ``save(model, path, *args)`` writes."""
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "model.pt"
        save(model, path, *args)
        return path.stat().st_size


def _sizes(fp32_state_bytes: int, fp32_ts_bytes: int, int8_ts_bytes: int) -> dict:
    return {
        "fp32_bytes": fp32_state_bytes, "fp32_ts_bytes": fp32_ts_bytes, "int8_ts_bytes": int8_ts_bytes,
        "deployed_size_ratio": int8_ts_bytes / fp32_state_bytes,
        "artifact_size_ratio": int8_ts_bytes / fp32_ts_bytes,
    }


def latency_and_size(models, batches, repeats, warmup, engines) -> list[dict]:
    from lightning_compress.models import create_model

    rows = []
    for name, engine in itertools.product(models, engines):
        torch.manual_seed(0)
        fp32 = create_model(name, num_classes=10).eval()
        calibration = [(torch.randn(16, 3, 32, 32),) for _ in range(4)]
        int8 = quantize_static(fp32, calibration, engine=engine)  # also selects the engine's kernels
        with tempfile.TemporaryDirectory() as workdir:
            scripted, file_bytes = _deployed(fp32, int8, engine, Path(workdir))
        variants = {"fp32": fp32, "fp32_ts": scripted["fp32_ts"], "int8": int8, "int8_ts": scripted["int8_ts"]}
        state_bytes = {"fp32": serialized_size(fp32), "int8": serialized_size(int8)}
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32)
            with torch.no_grad():  # the artifact (traced at batch 1) must compute what the eager int8 model does
                if not torch.equal(scripted["int8_ts"](x), int8(x)):
                    raise RuntimeError(f"{name}: the loaded int8 artifact disagrees with the int8 model at batch {batch}")
            reps = max(5, repeats // 8) if batch > 1 else repeats
            seconds = _interleaved_latency(variants, x, reps, warmup)
            row = {
                "model": name, "engine": engine, "batch": batch, "repeats": reps,
                **{f"{variant}_ms": 1e3 * seconds[variant] for variant in VARIANTS},
                "speedup": seconds["fp32"] / seconds["int8_ts"],
                "speedup_eager": seconds["fp32"] / seconds["int8"],
                "speedup_torchscript": seconds["fp32_ts"] / seconds["int8_ts"],
                "int8_bytes": state_bytes["int8"], "size_ratio": state_bytes["int8"] / state_bytes["fp32"],
                **_sizes(state_bytes["fp32"], file_bytes["fp32_ts"], file_bytes["int8_ts"]),
            }
            rows.append(row)
            print(f"{name:12s} {engine:7s} batch {batch:3d}: "
                  + "  ".join(f"{v} {row[v + '_ms']:8.2f} ms" for v in VARIANTS)
                  + f"  speed-up {row['speedup']:5.2f}x (eager {row['speedup_eager']:.2f}x, "
                  f"TorchScript {row['speedup_torchscript']:.2f}x)  size: artifact/fp32 state_dict "
                  f"{row['deployed_size_ratio']:.3f}, artifact/fp32 TorchScript {row['artifact_size_ratio']:.3f}, "
                  f"state_dicts {row['size_ratio']:.3f}", flush=True)
    return rows


def qat_callback(start: float) -> QuantizationAwareTraining:
    """QAT from ``start``; a late start (fine-tuning) also freezes BN and observers before the end."""
    if start == 0:
        return QuantizationAwareTraining(network="model", engine="x86")
    return QuantizationAwareTraining(network="model", start=start, freeze_bn=start + 0.6 * (1 - start),
                                     freeze_observers=start + 0.8 * (1 - start), engine="x86")


def accuracy(models, epochs: int, limit_train_batches: float, data_root: str, val_size: int,
             qat_starts: list[float], engines: list[str]) -> list[dict]:
    import lightning.pytorch as pl

    from lightning_compress.data import CIFARDataModule
    from lightning_compress.module import ImageClassifier

    def trainer(callbacks):
        return pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_train_batches=limit_train_batches,
            num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
        )

    example = (torch.randn(1, 3, 32, 32),)
    rows = []
    for name in models:
        results, artifact_bytes = {}, {}
        for variant in ("fp32", *(f"qat@{start:g}" for start in qat_starts)):
            pl.seed_everything(0)
            data = CIFARDataModule(root=data_root, download=False, val_size=val_size)
            model = ImageClassifier(name)
            callbacks = [qat_callback(float(variant[4:]))] if variant != "fp32" else []
            fit_trainer = trainer(callbacks)
            fit_trainer.fit(model, data)
            results[variant] = fit_trainer.test(model, data, verbose=False)[0]["test/acc"]
            if variant != "fp32":
                artifact_bytes[variant] = _file_bytes(save_quantized, model.model, example)
                continue
            fp32_network = model.model
            fp32_files = serialized_size(fp32_network), _file_bytes(_save_fp32_torchscript, fp32_network)
            # PTQ of this same fp32 model, calibrated on 32 normalized training batches
            calibration = [(data.transform(images, train=False),)
                           for images, _ in itertools.islice(data.train_dataloader(), 32)]
            for engine in engines:
                model.model = quantize_static(fp32_network, calibration, engine=engine)
                results[f"ptq ({engine})"] = trainer([]).test(model, data, verbose=False)[0]["test/acc"]
                artifact_bytes[f"ptq ({engine})"] = _file_bytes(save_quantized, model.model, example, engine)
        row = {"model": name, "epochs": epochs, "limit_train_batches": limit_train_batches, "results": results,
               "fp32_bytes": fp32_files[0],
               "sizes": {variant: _sizes(*fp32_files, size) for variant, size in artifact_bytes.items()}}
        print(row, flush=True)
        rows.append(row)
    return rows


def _size_cells(sizes: dict) -> str:
    met = "met" if sizes["deployed_size_ratio"] <= 0.27 else "not met"
    return f"{sizes['deployed_size_ratio']:.3f} | {met} | {sizes['artifact_size_ratio']:.3f}"


def _markdown(report: dict) -> str:
    lines = [
        "# Quantization benchmark: fp32 vs int8 (FX; x86 / onednn engines), CPU",
        "",
        f"Machine: {report['machine']['cpu']['model']} ({', '.join(report['machine']['cpu']['flags'])}), "
        f"{report['machine']['platform']}, {report['machine']['cpu_count']} CPUs (load average "
        f"{report['machine']['load_average_1_5_15']}), torch {report['machine']['torch']}, "
        f"{report['settings']['threads']} torch thread(s).",
        f"Settings: {json.dumps(report['settings'])}.",
        "Latency: fp32 eager, fp32 TorchScript (traced + frozen), int8 eager (FX GraphModule) and the int8 "
        "artifact (`save_quantized` file loaded back) called in turn in one process; medians. "
        "**speed-up** = fp32 eager / int8 artifact (the issue's measure); *eager* = fp32 eager / int8 eager; "
        "*TS* = fp32 TorchScript / int8 artifact (both compiled the same way).",
        "Size: **size ratio** = int8 artifact (`save_quantized` file: frozen TorchScript, deflated) / the fp32 "
        "model's `torch.save(state_dict)` file (the issue's measure); *vs TS* = int8 artifact / fp32 TorchScript "
        "written the same way (frozen, deflated); *state_dicts* = `torch.save(state_dict)` int8 / fp32. "
        "Weights here are random (kaiming init); trained models' sizes are in the accuracy table (if run).",
        "",
        "Issue targets: speed-up >= 2x at batch 1 and >= 3x at batch 64 for the ResNets; size ratio <= 0.27.",
        "",
        "| model | engine | batch | fp32 ms | fp32 TS ms | int8 eager ms | int8 artifact ms | speed-up | target | "
        "eager | TS | size ratio | size target | vs TS | state_dicts |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in report["latency"]:
        speed_target = (2.0 if row["batch"] == 1 else 3.0) if row["model"].startswith("resnet") else None
        speed = "-" if speed_target is None else f"{'met' if row['speedup'] >= speed_target else 'not met'} (>= {speed_target:g}x)"
        lines.append(f"| {row['model']} | {row['engine']} | {row['batch']} | {row['fp32_ms']:.2f} | "
                     f"{row['fp32_ts_ms']:.2f} | {row['int8_ms']:.2f} | {row['int8_ts_ms']:.2f} | "
                     f"{row['speedup']:.2f}x | {speed} | {row['speedup_eager']:.2f}x | "
                     f"{row['speedup_torchscript']:.2f}x | {_size_cells(row)} | {row['size_ratio']:.3f} |")
    if report["accuracy"]:
        lines += ["", "Test accuracy (int8 for PTQ and QAT; `qat@s`: QAT from run position s, same epochs); "
                  "drop = fp32 minus int8, in points (issue target for QAT: <= 0.5). File: the trained int8 "
                  "artifact (fp32: its `torch.save(state_dict)`); size ratios as above.", "",
                  "| model | epochs | variant | test acc | drop vs fp32 (points) | file kB | size ratio | "
                  "size target | vs TS |", "|---|---:|---|---:|---:|---:|---:|---|---:|"]
        for row in report["accuracy"]:
            fp32 = row["results"]["fp32"]
            for variant, acc in row["results"].items():
                sizes = row["sizes"].get(variant)
                size = (f"{sizes['int8_ts_bytes'] / 1e3:.1f} | {_size_cells(sizes)}" if sizes
                        else f"{row['fp32_bytes'] / 1e3:.1f} | - | - | -")
                lines.append(f"| {row['model']} | {row['epochs']} | {variant} | {acc:.4f} | "
                             f"{100 * (fp32 - acc):+.2f} | {size} |")
    else:
        lines += ["", "Accuracy section not run (needs `--accuracy-epochs N`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=200,
                        help="timed calls per variant at batch 1 (an eighth of it, at least 5, at larger batches)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engines", nargs="+", default=["x86", "onednn"], help="int8 engines timed against fp32")
    parser.add_argument("--quick", action="store_true", help="repeats=30, warmup=2")
    parser.add_argument("--accuracy-epochs", type=int, default=0, help="0 skips the accuracy section")
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    parser.add_argument("--qat-starts", nargs="+", type=float, default=[0.0, 0.75],
                        help="QAT start positions (fractions of the run) compared in the accuracy section")
    parser.add_argument("--data-root", default=SHARED_CIFAR10)
    parser.add_argument("--val-size", type=int, default=5000,
                        help="training images held out of training (no validation runs on them)")
    add_output_arguments(parser, "quantization")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 30, 2
    torch.set_num_threads(args.threads)
    settings = run_settings(args, omit=("data_root", "name"))
    report = {
        "machine": machine_info(),
        "settings": settings,
        "latency": latency_and_size(args.models, args.batches, args.repeats, args.warmup, args.engines),
        "accuracy": accuracy(args.models, args.accuracy_epochs, args.limit_train_batches, args.data_root,
                             args.val_size, args.qat_starts, args.engines) if args.accuracy_epochs else [],
    }
    write_results(args.name, report, _markdown(report), directory=args.results_dir)


if __name__ == "__main__":
    main()
