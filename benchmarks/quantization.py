"""fp32 eager vs int8 (FX; x86 and onednn engines) on CPU: latency ratio, serialized size ratio, accuracy.

Latency: for each model and batch size, fp32 and int8 calls are interleaved in one process
(fp32, int8, fp32, int8, ...) after warm-up, and the ratio of medians is reported, so load from
other processes on a shared machine hits both sides alike. The int8 model for latency/size is a
static-PTQ conversion calibrated on random data: same kernels and size as a QAT-converted one.

Engines (``--engines``): ``x86`` runs fbgemm's int8 kernels, ``onednn`` oneDNN's; each int8 model
is converted for its engine and timed with that engine selected.

Size: bytes of ``torch.save(state_dict)`` for fp32 vs the int8 model's (packed int8 weights).

Accuracy (``--accuracy-epochs N``, off by default): on the shared CIFAR-10 copy, fp32 trained N
epochs; PTQ of that fp32 model calibrated on 32 training batches (for each engine); QAT runs of the same N epochs, one
per ``--qat-starts`` position: ``0`` fake-quantizes from the first step, ``0.75`` trains fp32 for
three quarters of the run and fine-tunes with QAT for the last quarter (observers frozen at 0.95,
BN at 0.9); each is converted to int8; all are evaluated on the test set on CPU.

Run:  python benchmarks/quantization.py --quick            (small repeat counts)
      python benchmarks/quantization.py --accuracy-epochs 30 --models resnet20 mobilenetv2
      python benchmarks/quantization.py --quick --models resnet20 --accuracy-epochs 2 --qat-starts 0 0.75
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from reporting import SHARED_CIFAR10, machine_info, write_results
from lightning_compress.core.accounting import serialized_size
from lightning_compress.quantization import QuantizationAwareTraining, quantize_static

MODELS = ("resnet20", "resnet56", "mobilenetv2", "resnet18")


def _interleaved_latency(fp32, int8, x: torch.Tensor, repeats: int, warmup: int) -> tuple[float, float]:
    with torch.no_grad():
        for _ in range(warmup):
            fp32(x), int8(x)
        fp32_times, int8_times = [], []
        for _ in range(repeats):
            for model, times in ((fp32, fp32_times), (int8, int8_times)):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    return statistics.median(fp32_times), statistics.median(int8_times)


def latency_and_size(models, batches, repeats, warmup, engines) -> list[dict]:
    from lightning_compress.models import create_model

    rows = []
    for name, engine in itertools.product(models, engines):
        torch.manual_seed(0)
        fp32 = create_model(name, num_classes=10).eval()
        calibration = [(torch.randn(16, 3, 32, 32),) for _ in range(4)]
        int8 = quantize_static(fp32, calibration, engine=engine)  # also selects the engine's kernels
        size_ratio = serialized_size(int8) / serialized_size(fp32)
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32)
            reps = max(3, repeats // batch) if batch > 1 else repeats
            t_fp32, t_int8 = _interleaved_latency(fp32, int8, x, reps, warmup)
            rows.append({
                "model": name, "engine": engine, "batch": batch, "repeats": reps, "fp32_ms": 1e3 * t_fp32,
                "int8_ms": 1e3 * t_int8, "speedup": t_fp32 / t_int8, "fp32_bytes": serialized_size(fp32),
                "int8_bytes": serialized_size(int8), "size_ratio": size_ratio,
            })
            print(f"{name:12s} {engine:7s} batch {batch:3d}: fp32 {1e3 * t_fp32:8.2f} ms  int8 {1e3 * t_int8:8.2f} ms  "
                  f"speed-up {t_fp32 / t_int8:5.2f}x  size ratio {size_ratio:.3f}", flush=True)
    return rows


def qat_callback(start: float) -> QuantizationAwareTraining:
    """QAT from ``start``; a late start (fine-tuning) also freezes BN and observers before the end."""
    if start == 0:
        return QuantizationAwareTraining(network="model")
    return QuantizationAwareTraining(network="model", start=start, freeze_bn=start + 0.6 * (1 - start),
                                     freeze_observers=start + 0.8 * (1 - start))


def accuracy(models, epochs: int, limit_train_batches: float, data_root: str,
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

    rows = []
    for name in models:
        results = {}
        for variant in ("fp32", *(f"qat@{start:g}" for start in qat_starts)):
            pl.seed_everything(0)
            data = CIFARDataModule(root=data_root, download=False)
            model = ImageClassifier(name)
            callbacks = [qat_callback(float(variant[4:]))] if variant != "fp32" else []
            fit_trainer = trainer(callbacks)
            fit_trainer.fit(model, data)
            results[variant] = fit_trainer.test(model, data, verbose=False)[0]["test/acc"]
            if variant == "fp32":  # PTQ of this same fp32 model, calibrated on 32 normalized training batches
                calibration = [(data.transform(images, train=False),)
                               for images, _ in itertools.islice(data.train_dataloader(), 32)]
                fp32_network = model.model
                for engine in engines:
                    model.model = quantize_static(fp32_network, calibration, engine=engine)
                    results[f"ptq ({engine})"] = trainer([]).test(model, data, verbose=False)[0]["test/acc"]
        row = {"model": name, "epochs": epochs, "limit_train_batches": limit_train_batches, "results": results}
        print(row, flush=True)
        rows.append(row)
    return rows


def _markdown(report: dict) -> str:
    lines = [
        "# Quantization benchmark: fp32 eager vs int8 (FX; x86 / onednn engines), CPU",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs (load average "
        f"{report['machine']['load_average_1_5_15']}), torch {report['machine']['torch']}, "
        f"{report['settings']['threads']} torch thread(s).",
        f"Settings: {json.dumps(report['settings'])}.",
        "Latency: fp32 and int8 calls interleaved in one process, ratio of medians. Size: torch.save(state_dict).",
        "",
        "Issue targets: speed-up >= 2x at batch 1 and >= 3x at batch 64 for the ResNets; size ratio <= 0.27.",
        "",
        "| model | engine | batch | fp32 ms | int8 ms | speed-up | speed target | size ratio (int8/fp32) | size target |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for row in report["latency"]:
        speed_target = (2.0 if row["batch"] == 1 else 3.0) if row["model"].startswith("resnet") else None
        speed = "-" if speed_target is None else f"{'met' if row['speedup'] >= speed_target else 'not met'} (>= {speed_target:g}x)"
        size = "met" if row["size_ratio"] <= 0.27 else "not met"
        lines.append(f"| {row['model']} | {row['engine']} | {row['batch']} | {row['fp32_ms']:.2f} | {row['int8_ms']:.2f} | "
                     f"{row['speedup']:.2f}x | {speed} | {row['size_ratio']:.3f} | {size} |")
    if report["accuracy"]:
        lines += ["", "Test accuracy (int8 for PTQ and QAT; `qat@s`: QAT from run position s, same epochs); "
                  "drop = fp32 minus int8, in points (issue target for QAT: <= 0.5).", "",
                  "| model | epochs | variant | test acc | drop vs fp32 (points) |", "|---|---:|---|---:|---:|"]
        for row in report["accuracy"]:
            fp32 = row["results"]["fp32"]
            for variant, acc in row["results"].items():
                lines.append(f"| {row['model']} | {row['epochs']} | {variant} | {acc:.4f} | "
                             f"{100 * (fp32 - acc):+.2f} |")
    else:
        lines += ["", "Accuracy section not run (needs `--accuracy-epochs N`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per side at batch 1")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engines", nargs="+", default=["x86", "onednn"], help="int8 engines timed against fp32")
    parser.add_argument("--quick", action="store_true", help="repeats=30, warmup=2")
    parser.add_argument("--accuracy-epochs", type=int, default=0, help="0 skips the accuracy section")
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    parser.add_argument("--qat-starts", nargs="+", type=float, default=[0.0, 0.75],
                        help="QAT start positions (fractions of the run) compared in the accuracy section")
    parser.add_argument("--data-root", default=SHARED_CIFAR10)
    parser.add_argument("--name", default="quantization", help="results file name in benchmarks/results/")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 30, 2
    torch.set_num_threads(args.threads)
    settings = {key: value for key, value in vars(args).items() if key not in ("data_root", "name")}
    report = {
        "machine": machine_info(),
        "settings": settings,
        "latency": latency_and_size(args.models, args.batches, args.repeats, args.warmup, args.engines),
        "accuracy": accuracy(args.models, args.accuracy_epochs, args.limit_train_batches, args.data_root,
                             args.qat_starts, args.engines) if args.accuracy_epochs else [],
    }
    write_results(args.name, report, _markdown(report))


if __name__ == "__main__":
    main()
