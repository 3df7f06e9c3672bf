"""What the x86 int8 model's saturation at code 127 costs: the same converted network with and without it.

``convert`` (engines ``x86``/``onednn``) puts ``clamp_to_reduced_range`` after every value that sets its
own quantization parameters, so the int8 model saturates where fake-quantization did
(``lightning_compress/quantization/convert.py``, ``docs/quantization-design.md``). This script builds each network, fake-quantizes it for a few
steps of random data, converts it, and times the converted model against a copy whose clamps are removed:
interleaved rounds in one process, medians, 1 thread by default.

With ``--runtime onnxruntime`` it times the shipped QDQ ONNX file instead (``qdq_network``: the 8-bit codes
clipped at 127) against the same file without the clips, in onnxruntime, and records what onnxruntime runs
after its graph optimizations and how far each file is from the torch int8 model.

Run:
    python benchmarks/saturation_cost.py                                    # four networks, batch 1 and 64
    python benchmarks/saturation_cost.py --models resnet18 --batches 1 --rounds 1
    python benchmarks/saturation_cost.py --runtime onnxruntime --models resnet20 mobilenet_v2   # the ONNX file
Writes ``benchmarks/results/saturation_cost.{json,md}`` (``saturation_cost_onnx`` with ``--runtime onnxruntime``;
or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
import torchvision

from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.accounting import measure_latency
from lightning_compress.models import create_model, list_models
from lightning_compress.quantization.convert import clamp_to_reduced_range, convert
from lightning_compress.quantization.prepare import frozen_copy, prepare
from reporting import add_output_arguments, machine_info, run_settings, write_results

MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "timm:efficientnet_b0", "timm:ghostnet_100")


def build(name: str) -> torch.nn.Module:
    """A fresh 10-class network: our zoo's, torchvision's, or timm's (``timm:``, the optional ``[timm]`` extra)."""
    if name in list_models():
        return create_model(name, num_classes=10)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[len("timm:"):], num_classes=10)
    return getattr(torchvision.models, name)(num_classes=10)


def without_clamps(int8: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a converted model with every ``clamp_to_reduced_range`` node removed."""
    plain = copy.deepcopy(int8)
    for node in list(plain.graph.nodes):
        if node.target is clamp_to_reduced_range:
            node.replace_all_uses_with(node.args[0])
            plain.graph.erase_node(node)
    plain.recompile()
    return plain


def worst_layer_error(int8: torch.fx.GraphModule, inputs: torch.Tensor) -> float:
    """The largest error of any quantized Conv/Linear of ``int8`` on ``inputs``, in its output's quantization steps.

    Each layer is compared with a float computation on the very int8 input it received (dequantized input and
    weights, float bias, requantized with the layer's output parameters): a kernel that overflows shows here,
    whatever the layers before it did.
    """
    seen: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = [module.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
             for module in int8.modules()
             if isinstance(module, (torch.ao.nn.quantized.Conv2d, torch.ao.nn.quantized.Linear))]
    with torch.no_grad():
        int8(inputs)
    for hook in hooks:
        hook.remove()
    worst = 0.0
    for module, x, out in seen:
        weight = module.weight().dequantize()
        if isinstance(module, torch.ao.nn.quantized.Linear):
            exact = torch.nn.functional.linear(x.dequantize(), weight, module.bias())
        else:
            exact = torch.nn.functional.conv2d(x.dequantize(), weight, module.bias(), module.stride, module.padding,
                                               module.dilation, module.groups)
        if type(module).__name__.endswith("ReLU2d") or type(module).__name__.endswith("ReLU"):
            exact = exact.relu()
        exact = torch.quantize_per_tensor(exact, float(module.scale), int(module.zero_point), torch.quint8)
        worst = max(worst, float((out.dequantize() - exact.dequantize()).abs().max()) / float(module.scale))
    return worst


def measure(name: str, batches: list[int], rounds: int, repeats: int, steps: int) -> dict:
    """Median latency of the converted network with and without its clamps, per batch size."""
    torch.manual_seed(0)
    prepared = prepare(build(name), "x86", mode="qat")
    for _ in range(steps):
        prepared(torch.randn(8, 3, 32, 32))
    clamped = convert(frozen_copy(prepared), "x86")
    # fresh copies of both: the two are timed as modules built the same way
    clamped, plain = copy.deepcopy(clamped), without_clamps(clamped)
    clamps = sum(node.target is clamp_to_reduced_range for node in clamped.graph.nodes)
    probe = torch.randn(8, 3, 32, 32)
    row = {"model": name, "clamps": clamps, "worst_layer_error_steps": {
        # on copies: the timed modules never carry hooks
        "without_clamps": worst_layer_error(copy.deepcopy(plain), probe),
        "with_clamps": worst_layer_error(copy.deepcopy(clamped), probe)},
        "latency": []}
    for batch in batches:
        example = (torch.randn(batch, 3, 32, 32),)
        times: dict[str, list[float]] = {"plain": [], "clamped": []}
        for _ in range(rounds):
            for key, network in (("plain", plain), ("clamped", clamped)):
                times[key].append(measure_latency(network, example, repeats=repeats, warmup=2))
        plain_ms, clamped_ms = (statistics.median(times[key]) * 1e3 for key in ("plain", "clamped"))
        row["latency"].append({"batch": batch, "plain_ms": plain_ms, "clamped_ms": clamped_ms,
                               "cost": clamped_ms / plain_ms - 1})
    return row


def measure_onnx(name: str, batches: list[int], rounds: int, repeats: int, steps: int, threads: int) -> dict:
    """Median latency of the QDQ ONNX file with and without its clips at code 127, in onnxruntime, per batch."""
    from deploy_latency import optimized_ops
    from lightning_compress.core.onnx import OnnxRuntimeNetwork
    from lightning_compress.quantization.qdq import QuantizeDequantize, qdq_network, qdq_onnx_bytes

    torch.manual_seed(0)
    prepared = prepare(build(name), "x86", mode="qat")
    for _ in range(steps):
        prepared(torch.randn(8, 3, 32, 32))
    example = torch.randn(1, 3, 32, 32)
    qdq = qdq_network(prepared)
    quantizers = [qdq.get_submodule(node.target) for node in qdq.graph.nodes if node.op == "call_module"]
    step = float([m for m in quantizers if isinstance(m, QuantizeDequantize)][-1].scale)  # the logits' grid
    blobs = {"clamped": qdq_onnx_bytes(qdq, example),
             "plain": qdq_onnx_bytes(qdq_network(prepared, saturate_at_trained_range=False), example)}
    networks = {key: OnnxRuntimeNetwork(blob, threads) for key, blob in blobs.items()}
    probe = torch.randn(64, 3, 32, 32) * 1.5  # beyond the range the few passes calibrated
    with torch.no_grad():
        int8 = convert(frozen_copy(prepared), "x86")(probe)
        logits = {key: network(probe) for key, network in networks.items()}
    row = {"model": name, "ops": {key: optimized_ops(blob) for key, blob in blobs.items()},
           "vs_torch_int8_steps": {key: (out - int8).abs().max().item() / step for key, out in logits.items()},
           "latency": []}
    for batch in batches:
        example = (torch.randn(batch, 3, 32, 32),)
        times: dict[str, list[float]] = {"plain": [], "clamped": []}
        for round_ in range(rounds):
            for key in (("plain", "clamped") if round_ % 2 == 0 else ("clamped", "plain")):
                times[key].append(measure_latency(networks[key], example, repeats=repeats, warmup=2))
        plain_ms, clamped_ms = (statistics.median(times[key]) * 1e3 for key in ("plain", "clamped"))
        row["latency"].append({"batch": batch, "plain_ms": plain_ms, "clamped_ms": clamped_ms,
                               "cost": clamped_ms / plain_ms - 1})
    return row


def markdown_onnx(result: dict) -> str:
    machine = result["machine"]
    lines = [
        "# Cost of saturating x86 int8 activations at code 127 in the shipped QDQ ONNX file",
        "",
        f"Machine: {machine['cpu']['model']} ({', '.join(machine['cpu']['flags'])}), {machine['cpu_count']} CPUs "
        f"shared with other jobs, torch {machine['torch']}, onnxruntime {result['onnxruntime']}, "
        f"{result['settings']['threads']} thread(s), load average at the end {machine['load_average_1_5_15']}. "
        f"Settings: {result['settings']}.",
        "",
        "Each network: fresh random weights, a few fake-quantized forward passes on random data (engine `x86`), "
        "exported by `qdq_onnx_bytes(qdq_network(prepared))`: each activation's 8-bit codes clipped at 127 "
        "(`QuantizeLinear -> Clip -> DequantizeLinear`), as the fake-quant and torch int8 models saturate; timed "
        "against the same file without the clips (`saturate_at_trained_range=False`), alternating order in "
        "interleaved rounds, medians, onnxruntime CPU. *vs torch int8*: on 64 random inputs 1.5x the calibrated "
        "range, the largest logit difference from the in-process x86 int8 model, in steps of the logits' "
        "quantization grid. Random weights amplify rounding differences (on resnet18 any two implementations, "
        "torch's own fake-quant and int8 models included, differ by several steps), so these columns show only "
        "where a file saturates differently; fidelity on trained networks is checked by "
        "`tests/quantization/test_shipped_parity.py` and measured on CIFAR-10 in `deploy_accuracy.md`.",
        "",
        "| model | batch | without clips ms | with clips ms | cost | QLinearConv with / without | float Conv with | "
        "Clip with | vs torch int8 without clips | vs torch int8 with clips |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        ops, check = row["ops"], row["vs_torch_int8_steps"]
        for cell in row["latency"]:
            lines.append(
                f"| {row['model']} | {cell['batch']} | {cell['plain_ms']:.3f} | {cell['clamped_ms']:.3f} | "
                f"{cell['cost']:+.1%} | {ops['clamped'].get('QLinearConv', 0)} / {ops['plain'].get('QLinearConv', 0)} | "
                f"{ops['clamped'].get('Conv', 0) + ops['clamped'].get('FusedConv', 0)} | {ops['clamped'].get('Clip', 0)} | "
                f"{check['plain']:.3g} steps | {check['clamped']:.3g} steps |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        "# Cost of saturating x86 int8 activations at code 127",
        "",
        f"Machine: {machine['cpu']['model']} ({', '.join(machine['cpu']['flags'])}), {machine['cpu_count']} CPUs, "
        f"torch {machine['torch']}, {result['settings']['threads']} thread(s), load average at the end "
        f"{machine['load_average_1_5_15']}. Settings: {result['settings']}.",
        "",
        "Each network: fresh random weights, a few fake-quantized forward passes on random data, converted with "
        "engine `x86`; the converted model is timed against the same model with its clamps removed, interleaved "
        "rounds, medians (eager FX module, 32x32 inputs). *Worst layer error*: on one random batch, the largest "
        "difference between a quantized Conv/Linear's output and the float computation on the same int8 input, "
        "in quantization steps of that output (1 = rounding): larger means the int8 kernel overflowed.",
        "",
        "| model | clamps | worst layer error without / with clamps (steps) | batch | without clamps ms | "
        "with clamps ms | cost |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        errors = row["worst_layer_error_steps"]
        for cell in row["latency"]:
            lines.append(f"| {row['model']} | {row['clamps']} | {errors['without_clamps']:.0f} / "
                         f"{errors['with_clamps']:.0f} | {cell['batch']} | {cell['plain_ms']:.3f} | "
                         f"{cell['clamped_ms']:.3f} | {cell['cost']:+.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per batch size")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    parser.add_argument("--steps", type=int, default=3, help="fake-quantized forward passes before converting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                        help="time torch's int8 model or the shipped QDQ ONNX file (default: %(default)s)")
    add_output_arguments(parser, "saturation_cost")
    args = parser.parse_args()
    onnx = args.runtime == "onnxruntime"
    name = f"{args.name}_onnx" if onnx and args.name == "saturation_cost" else args.name
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    rows = []
    for model in args.models:
        rows.append(measure_onnx(model, args.batches, args.rounds, args.repeats, args.steps, args.threads) if onnx
                    else measure(model, args.batches, args.rounds, args.repeats, args.steps))
        result = {"machine": machine_info(), "settings": run_settings(args), "results": rows}
        if onnx:
            result["onnxruntime"] = __import__("onnxruntime").__version__
        text = markdown_onnx(result) if onnx else markdown(result)
        write_results(name, result, text, directory=args.results_dir)  # row by row
        print("\n".join(text.splitlines()[-len(args.batches):]), flush=True)


if __name__ == "__main__":
    main()
