"""Deployment latency on CPU: torch fp32 eager, onnxruntime fp32, torch int8 TorchScript (x86), onnxruntime's own
``quantize_static`` (U8S8 QDQ) and our QDQ ONNX model (built from the learned parameters), side by side.

For each model, thread count and batch size the five variants are called in turn in one process after
warm-up, and medians are reported, so load from other processes hits all alike. Networks have random
weights with BatchNorm statistics calibrated on a few random batches (realistic ranges); the int8
variants are calibrated on the same random batches: torch's static PTQ for ``x86`` (``save_quantized`` file,
read back), onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations) of the
fp32 ONNX model, and ours (``PostTrainingQuantization``'s ``onnxruntime`` engine: the same file QAT exports).

Run:  python benchmarks/deploy_latency.py                 (all models, batch 1 and 64, 1 and 2 threads)
      python benchmarks/deploy_latency.py --models resnet20 --batches 1 --threads 1 --repeats 3
Writes ``benchmarks/results/deploy_latency.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reporting import add_output_arguments, machine_info, run_settings, write_results
from lightning_compress.export.onnx import OnnxRuntimeNetwork, onnx_bytes
from lightning_compress.models import create_model
from lightning_compress.quantization import load_quantized, quantize_static, save_quantized

MODELS = ("resnet20", "resnet56", "mobilenetv2", "resnet18")
VARIANTS = ("torch_fp32", "ort_fp32", "torch_int8_x86", "ort_quantize_static", "ours_qdq")


def calibrated_network(name: str, batches: list[torch.Tensor]) -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model(name, num_classes=10).train()
    with torch.no_grad():
        for x in batches:
            net(x)
    return net.eval()


def ort_quantize_static(fp32_onnx: bytes, batches: list[torch.Tensor]) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static as ort_qs
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"images": x.numpy()} for x in batches])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (Path(folder) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        source.write_bytes(fp32_onnx)
        quant_pre_process(str(source), str(prepared))  # BN/Conv folding, shape inference, as ORT recommends
        ort_qs(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
               activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return target.read_bytes()


def median_ms(models: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
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
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per variant (batch 1: 5x)")
    parser.add_argument("--calibration-batches", type=int, default=4)
    add_output_arguments(parser, "deploy_latency")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(16, 3, 32, 32, generator=generator) for _ in range(args.calibration_batches)]
    rows = []
    for name in args.models:
        net = calibrated_network(name, calibration)
        fp32_onnx = onnx_bytes(net, calibration[0][:1])
        ort_int8 = ort_quantize_static(fp32_onnx, calibration)
        ours = quantize_static(net, [(x,) for x in calibration], engine="onnxruntime")
        x86 = quantize_static(net, [(x,) for x in calibration], engine="x86")
        with tempfile.TemporaryDirectory() as folder:
            save_quantized(x86, Path(folder) / "int8.pt", (calibration[0][:1],), "x86")
            x86_file = load_quantized(Path(folder) / "int8.pt")
        sizes = {"ort_fp32": len(fp32_onnx), "ort_quantize_static": len(ort_int8), "ours_qdq": len(ours.model_bytes())}
        for threads in args.threads:
            torch.set_num_threads(threads)
            models = {"torch_fp32": net, "ort_fp32": OnnxRuntimeNetwork(fp32_onnx, threads),
                      "torch_int8_x86": x86_file, "ort_quantize_static": OnnxRuntimeNetwork(ort_int8, threads),
                      "ours_qdq": OnnxRuntimeNetwork(ours.model_bytes(), threads)}
            for batch in args.batches:
                x = torch.randn(batch, 3, 32, 32, generator=generator)
                repeats = args.repeats * (5 if batch == 1 else 1)
                ms = median_ms(models, x, repeats, warmup=2)
                rows.append({"model": name, "threads": threads, "batch": batch, "repeats": repeats, "ms": ms,
                             "bytes": sizes})
                print(name, threads, batch, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    result = {"machine": machine_info(), "settings": run_settings(args), "rows": rows,
              "onnxruntime": __import__("onnxruntime").__version__}
    lines = [
        "# Deployment latency (CPU): fp32 vs int8, torch vs onnxruntime",
        "",
        f"Machine: {result['machine']['cpu']['model']}, flags {', '.join(result['machine']['cpu']['flags'])}; "
        f"{result['machine']['cpu_count']} cores, load average at the end {result['machine']['load_average_1_5_15']} "
        f"(shared machine); torch {torch.__version__}, onnxruntime {result['onnxruntime']}. Median ms per call, "
        "random weights with BN statistics calibrated on random batches; int8 calibrated on the same batches.",
        "",
        "| model | threads | batch | torch fp32 eager | onnxruntime fp32 | torch int8 `.pt` (x86) | "
        "onnxruntime int8 (`quantize_static`) | ours: QDQ ONNX | ours vs ort fp32 | ours vs `quantize_static` |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ms = row["ms"]
        lines.append(f"| {row['model']} | {row['threads']} | {row['batch']} | " + " | ".join(
            f"{ms[v]:.3g}" for v in VARIANTS) + f" | {ms['ort_fp32'] / ms['ours_qdq']:.2f}x faster | "
            f"{ms['ours_qdq'] / ms['ort_quantize_static']:.2f}x the latency |")
    lines += ["", "Sizes (bytes): " + "; ".join(
        f"{name}: fp32 ONNX {r['bytes']['ort_fp32']:,}, quantize_static {r['bytes']['ort_quantize_static']:,}, "
        f"ours {r['bytes']['ours_qdq']:,}" for name, r in {row["model"]: row for row in rows}.items()), ""]
    write_results(args.name, result, "\n".join(lines), args.results_dir)


if __name__ == "__main__":
    main()
