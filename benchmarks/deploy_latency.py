"""Deployment latency on CPU: torch fp32 eager, onnxruntime fp32, torch int8 TorchScript (x86), onnxruntime's own
``quantize_static`` (U8S8 QDQ), our QDQ ONNX model (built from the learned parameters) in onnxruntime and in
OpenVINO, and the PT2E engine's int8 graph compiled by AOTInductor (``x86_inductor``), side by side.

For each model, thread count and batch size the variants are called in turn in one process after
warm-up (the order reversed on every other round, so no variant always runs right after another), and
medians are reported, so load from other processes hits all alike; the 1-minute load average is recorded
with every row. The structure onnxruntime actually runs is recorded too: the op types of each int8 model
after onnxruntime's graph optimizations (``QLinearConv`` = an int8 kernel; ``Conv``/``Clip`` = float work
left between the quantized ones). Networks have random
weights with BatchNorm statistics calibrated on a few random batches (realistic ranges); the int8
variants are calibrated on the same random batches: torch's static PTQ for ``x86`` (``save_quantized`` file,
read back), onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations) of the
fp32 ONNX model, ours (``PostTrainingQuantization``'s ``onnxruntime`` engine: the same file QAT exports; OpenVINO
reads that very file; and the ``onnxruntime_7bit`` engine's file, in onnxruntime and OpenVINO, whose weights fit
the fast kernels exactly on CPUs without VNNI) and the ``x86_inductor`` engine's int8 graph as the ``model.pt2`` package ``export`` writes
(compiled once per model, dynamic batch size), and the ``xnnpack`` engine's int8 graph as the ``model.pte``
ExecuTorch program (``--runtimes`` leaves any of the three out).

Run:  python benchmarks/deploy_latency.py                 (all models, batch 1 and 64, 1 and 2 threads)
      python benchmarks/deploy_latency.py --models resnet20 --batches 1 --threads 1 --repeats 3
Writes ``benchmarks/results/deploy_latency.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import collections
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from reporting import add_output_arguments, machine_info, run_settings, write_results
from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.onnx import OnnxRuntimeNetwork, onnx_bytes
from lightning_compress.core.timing_lock import exclusive_timing, shared_timing
from lightning_compress.export.aoti import AotiNetwork
from lightning_compress.export.executorch import ExecuTorchNetwork, use_threads
from lightning_compress.export.openvino import OpenVinoNetwork
from lightning_compress.models import create_model
from lightning_compress.quantization import load_quantized, quantize_static, save_quantized

MODELS = ("resnet20", "resnet56", "mobilenetv2", "resnet18")
OPTIONAL_RUNTIMES = ("openvino", "aoti", "executorch")
"""Runtimes beside torch and onnxruntime: OpenVINO runs our QDQ file, AOTInductor the x86_inductor graph,
ExecuTorch (XNNPACK) the xnnpack graph."""
LABELS = {"torch_fp32": "torch fp32 eager", "ort_fp32": "onnxruntime fp32", "torch_int8_x86": "torch int8 `.pt` (x86)",
          "ort_quantize_static": "onnxruntime int8 (`quantize_static`)", "ours_qdq": "ours: QDQ ONNX in onnxruntime",
          "ours_7bit": "ours, 7-bit weights (`onnxruntime_7bit`), in onnxruntime",
          "openvino_qdq": "ours: the same file in OpenVINO", "openvino_ir": "OpenVINO IR of that file (`.xml`/`.bin`)",
          "openvino_7bit": "the 7-bit file in OpenVINO",
          "aoti_int8": "AOTInductor `.pt2` (x86_inductor)",
          "executorch_int8": "ExecuTorch `.pte` (xnnpack; its pool: the fewest --threads)"}


def calibrated_network(name: str, batches: list[torch.Tensor]) -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model(name, num_classes=10).train()
    with torch.no_grad():
        for x in batches:
            net(x)
    return net.eval()


class OpenVinoIr(torch.nn.Module):
    """An ONNX model converted once to OpenVINO's own IR (``openvino.save_model``, weights kept as they are) and
    compiled from the ``.xml``/``.bin`` pair, as a deployment that ships the IR would; ``compile_s`` times reading
    and compiling the IR, ``onnx_compile_s`` the same from the ONNX file."""

    def __init__(self, onnx_model: bytes, threads: int, folder: Path) -> None:
        super().__init__()
        import openvino

        core, config = openvino.Core(), {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
        xml = folder / "model.xml"
        openvino.save_model(core.read_model(onnx_model), str(xml), compress_to_fp16=False)
        start = time.perf_counter()
        core.compile_model(core.read_model(onnx_model), "CPU", config)
        self.onnx_compile_s = time.perf_counter() - start
        start = time.perf_counter()
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        self.compile_s = time.perf_counter() - start

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled(images.numpy())[0].copy())


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


def optimized_ops(model: bytes) -> dict[str, int]:
    """Op types (and counts) of the graph onnxruntime runs after all its optimizations (QDQ fusion)."""
    import onnx
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        options.log_severity_level = 3
        onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        counts = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    return dict(sorted(counts.items()))


def median_ms(models: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    with torch.no_grad(), exclusive_timing():  # processes holding the timing lock shared (suite rows) pause
        for _ in range(warmup):
            for model in models.values():
                model(x)
        times = {name: [] for name in models}
        for round_ in range(repeats):
            for name, model in (reversed(models.items()) if round_ % 2 else models.items()):
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def markdown(result: dict) -> str:
    """The results table, the structure onnxruntime runs and the sizes, from the JSON result."""
    variants = [v for v in LABELS if v in result["rows"][0]["ms"]]
    seven = "ours_7bit" in variants
    lines = [
        "# Deployment latency (CPU): fp32 vs int8 in torch, onnxruntime, OpenVINO, AOTInductor and ExecuTorch",
        "",
        f"Machine: {result['machine']['cpu']['model']}, flags {', '.join(result['machine']['cpu']['flags'])}; "
        f"{result['machine']['cpu_count']} cores, load average at the end {result['machine']['load_average_1_5_15']} "
        f"(shared machine); torch {result['machine']['torch']}, onnxruntime {result['onnxruntime']}, OpenVINO "
        f"{result.get('openvino', '-')}. Median ms per call, "
        "random weights with BN statistics calibrated on random batches; int8 calibrated on the same batches.",
        "",
        f"Noise: {result['machine']['cpu_count']} cores shared with other jobs (1-minute load average recorded "
        "with each row). Each cell is the median of the row's `repeats` calls, the variants called in turn "
        "(order reversed every other round), so load hits them alike and the ratios are the robust part. The "
        "2-thread rows compete with that load for both cores: torch's OpenMP threads spin and their eager and "
        "int8 cells are inflated many times, and any single 2-thread cell (onnxruntime ones too) can be off by 10x; read the 1-thread rows.",
        "",
        "| model | threads | batch | load (1 min) | " + " | ".join(LABELS[v] for v in variants) +
        " | ours vs ort fp32 | ours vs `quantize_static` | " + ("7-bit vs ort fp32 | " if seven else "")
        + "fastest int8 |",
        "|---|---:|---:|---:|" + "---:|" * (len(variants) + 3 + seven),
    ]
    for row in result["rows"]:
        ms = row["ms"]
        int8 = [v for v in variants if v not in ("torch_fp32", "ort_fp32")]
        fastest = min(int8, key=ms.__getitem__)
        lines.append(f"| {row['model']} | {row['threads']} | {row['batch']} | {row['load_average_1min']} | " + " | ".join(
            f"{ms[v]:.3g}" for v in variants) + f" | {ms['ort_fp32'] / ms['ours_qdq']:.2f}x faster | "
            f"{ms['ours_qdq'] / ms['ort_quantize_static']:.2f}x the latency | "
            + (f"{ms['ort_fp32'] / ms['ours_7bit']:.2f}x faster | " if seven else "") + f"{LABELS[fastest]} |")
    float_ops = {"Conv", "FusedConv", "Clip", "Relu", "Add", "Gemm", "MatMul"}
    lines += ["", "What onnxruntime runs (int8 models after its graph optimizations; float ops = "
              f"{'/'.join(sorted(float_ops))}):", "",
              "| model | int8 model | QLinearConv | QLinearAdd | float ops left | QuantizeLinear | DequantizeLinear |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, models in result["optimized_ops"].items():
        for variant, ops in models.items():
            lines.append(f"| {name} | {variant} | {ops.get('QLinearConv', 0)} | {ops.get('QLinearAdd', 0)} | "
                         f"{sum(ops.get(op, 0) for op in float_ops)} | {ops.get('QuantizeLinear', 0)} | "
                         f"{ops.get('DequantizeLinear', 0)} |")
    lines += ["", "Sizes (bytes): " + "; ".join(
        f"{name}: fp32 ONNX {r['bytes']['ort_fp32']:,}, quantize_static {r['bytes']['ort_quantize_static']:,}, "
        f"ours {r['bytes']['ours_qdq']:,}" + "".join(
            f", {LABELS[k]} {r['bytes'][k]:,}" for k in ("ours_7bit", "aoti_int8", "executorch_int8") if k in r["bytes"]) for name, r in {row["model"]: row for row in result["rows"]}.items()), ""]
    if result.get("openvino_compile_s"):
        lines += ["OpenVINO read + compile seconds, from the QDQ ONNX file vs from its IR: " + "; ".join(
            f"{key}: {value['onnx']:.3g} vs {value['ir']:.3g}" for key, value in result["openvino_compile_s"].items()),
            ""]
    return "\n".join(lines)


def main() -> None:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per variant (batch 1: 5x)")
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--runtimes", nargs="*", default=list(OPTIONAL_RUNTIMES), choices=OPTIONAL_RUNTIMES,
                        help="optional runtimes beside torch and onnxruntime (default: all)")
    add_output_arguments(parser, "deploy_latency")
    args = parser.parse_args()
    if "executorch" in args.runtimes:  # its own thread pool, sized once, before any program runs
        use_threads(min(args.threads))
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(16, 3, 32, 32, generator=generator) for _ in range(args.calibration_batches)]
    rows, structure, compile_s = [], {}, {}
    for name in args.models:
        # builds hold the timing lock shared: another process's measurement waits for them (and this one's
        # timing, exclusive, for the other's)
        with shared_timing():
            net = calibrated_network(name, calibration)
            fp32_onnx = onnx_bytes(net, calibration[0][:1])
            ort_int8 = ort_quantize_static(fp32_onnx, calibration)
            ours = quantize_static(net, [(x,) for x in calibration], engine="onnxruntime")
            ours_7bit = quantize_static(net, [(x,) for x in calibration], engine="onnxruntime_7bit")
            x86 = quantize_static(net, [(x,) for x in calibration], engine="x86")
            with tempfile.TemporaryDirectory() as folder:
                save_quantized(x86, Path(folder) / "int8.pt", (calibration[0][:1],), "x86")
                x86_file = load_quantized(Path(folder) / "int8.pt")
            sizes = {"ort_fp32": len(fp32_onnx), "ort_quantize_static": len(ort_int8), "ours_qdq": len(ours.program_bytes()),
                     "ours_7bit": len(ours_7bit.program_bytes())}
            shipped = {}  # the PT2E engines' quantize_static returns the program it ships (AOTI package, .pte)
            for runtime, engine in (("aoti", "x86_inductor"), ("executorch", "xnnpack")):
                if runtime in args.runtimes:
                    shipped[runtime] = quantize_static(net, [(x,) for x in calibration], engine=engine)
                    if not isinstance(shipped[runtime], (AotiNetwork, ExecuTorchNetwork)):
                        raise SystemExit(f"deploy_latency: {engine} did not ship a program here (AOTInductor needs a "
                                         f"C++ compiler); leave {runtime} out with --runtimes")
                    sizes[f"{runtime}_int8"] = len(shipped[runtime].program_bytes())
            structure[name] = {"ort_quantize_static": optimized_ops(ort_int8), "ours_qdq": optimized_ops(ours.program_bytes())}
            for threads in args.threads:
                torch.set_num_threads(threads)
                models = {"torch_fp32": net, "ort_fp32": OnnxRuntimeNetwork(fp32_onnx, threads),
                          "torch_int8_x86": x86_file, "ort_quantize_static": OnnxRuntimeNetwork(ort_int8, threads),
                          "ours_qdq": OnnxRuntimeNetwork(ours.program_bytes(), threads),
                          "ours_7bit": OnnxRuntimeNetwork(ours_7bit.program_bytes(), threads)}
                if "openvino" in args.runtimes:
                    models["openvino_qdq"] = OpenVinoNetwork(ours.program_bytes(), threads)
                    models["openvino_7bit"] = OpenVinoNetwork(ours_7bit.program_bytes(), threads)
                    models["openvino_ir"] = OpenVinoIr(ours.program_bytes(), threads, Path(tempfile.mkdtemp()))
                    compile_s[f"{name} {threads} thread(s)"] = {"onnx": round(models["openvino_ir"].onnx_compile_s, 3),
                                                                "ir": round(models["openvino_ir"].compile_s, 3)}
                models.update({f"{runtime}_int8": program for runtime, program in shipped.items()})
                for batch in args.batches:
                    x = torch.randn(batch, 3, 32, 32, generator=generator)
                    repeats = args.repeats * (5 if batch == 1 else 1)
                    load = round(os.getloadavg()[0], 2)
                    ms = median_ms(models, x, repeats, warmup=2)
                    rows.append({"model": name, "threads": threads, "batch": batch, "repeats": repeats, "ms": ms,
                                 "bytes": sizes, "load_average_1min": load})
                    print(name, threads, batch, f"load {load}", {k: round(v, 3) for k, v in ms.items()}, flush=True)
    result = {"machine": machine_info(), "settings": run_settings(args), "rows": rows, "optimized_ops": structure,
              "openvino_compile_s": compile_s,
              "onnxruntime": __import__("onnxruntime").__version__, "openvino": __import__("openvino").__version__}
    write_results(args.name, result, markdown(result), args.results_dir)


if __name__ == "__main__":
    main()
