"""Where the per-layer latency table and a whole network disagree: each layer's time in the table (timed alone)
against the time onnxruntime's profiler gives the same layer inside the network (issue 24).

The planner's table times every convolution alone (plain NCHW in and out). Inside a network onnxruntime runs fp32
convolutions in its blocked NCHWc layout and inserts layout reorders where a layer cannot take or give blocks, so a
layer can cost more or less there than alone. For the dense network and for the widths that suite rows planned
(their ``target_plan`` in a suite results file), this runs the network in onnxruntime with profiling on (random
weights: latency depends on the shapes only) and groups the convolutions by shape class: input channels, output
channels as onnxruntime runs them (padded to its block), kernel and spatial size in and out; a reorder node is
charged to the convolution before it. Per class: the table's milliseconds (the sum over the layers of that class)
against the profile's, and per network the table sum, the profile's total and the end-to-end median.

Run:  python benchmarks/latency_in_context.py        (ResNet-56, batch 64, the suite's resnet56_target50 rows)
      python benchmarks/latency_in_context.py --model resnet20 --rows target50 target50_uniform
      python benchmarks/latency_in_context.py --model mobilenetv2 --rows --name latency_in_context_mobilenetv2
      python benchmarks/latency_in_context.py --model mobilenetv2 --rows --plans benchmarks/results/latency_model.json
Writes ``benchmarks/results/latency_in_context.{json,md}``.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from deploy_latency import calibrated_network
from reporting import (
    RESULTS_DIR,
    add_output_arguments,
    machine_info,
    machine_line,
    run_settings,
    write_results,
)

from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.onnx import onnx_bytes
from lightning_compress.core.timing_lock import exclusive_timing
from lightning_compress.planning.latency import LatencyTable, channel_block, timed_programs
from lightning_compress.planning.widths import channel_space, slimmed_copy


def profiled_convolutions(model: bytes, array: Any, threads: int, calls: int) -> tuple[dict[tuple, list[float]], float]:
    """Milliseconds per call of each convolution in onnxruntime's profile (``calls`` calls after a warm-up call), a
    following reorder charged to it, by shape class ``(in channels, out channels as run, kernel, size in, size out)``;
    and the profile's total."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: array}
        for _ in range(calls + 1):  # the first call (weights packed, buffers allocated) is a warm-up, not counted
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [event for event in events if event.get("cat") == "Session" and event["name"] == "model_run"]
    warm_from = runs[0]["ts"] + runs[0]["dur"]
    per_node: dict[str, list] = {}  # convolution node -> [class, milliseconds over every call]
    total, last = 0.0, None
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < warm_from:
            continue
        args, ms = event["args"], event["dur"] / 1e3 / calls
        total += ms
        if args["op_name"] == "Conv":
            (_, channels_in, *size_in), (channels_out, _, *kernel) = (next(iter(shape.values())) for shape in
                                                                     args["input_type_shape"][:2])
            size_out = next(iter(args["output_type_shape"][0].values()))[2:]
            last = event["name"]
            key = (channels_in, channels_out, tuple(kernel), tuple(size_in), tuple(size_out))
            per_node.setdefault(last, [key, 0.0])[1] += ms
        elif args["op_name"].startswith("Reorder") and last is not None:
            per_node[last][1] += ms
    by_class: dict[tuple, list[float]] = defaultdict(list)
    for key, ms in per_node.values():
        by_class[key].append(ms)
    return dict(by_class), total


def table_classes(table: LatencyTable, shapes: dict, block: int) -> dict[tuple, list[float]]:
    """The table's milliseconds of each layer (convolutions), by the shape class onnxruntime runs it as."""
    def padded(channels: int, blocked: bool = True) -> int:  # onnxruntime's NCHWc pads channels to its block
        return -(-channels // block) * block if block and blocked else channels

    by_class: dict[tuple, list[float]] = defaultdict(list)
    for shape in shapes.values():
        if shape.kind != "conv":
            continue
        # input fewer than a block: plain NCHW in (the kernel for a network's first layers)
        by_class[(padded(shape.in_channels, shape.in_channels > block), padded(shape.out_channels), tuple(shape.kernel), tuple(shape.size), tuple(shape.output_size()))].append(
            table.layer_ms(shape, int8=False))
    return by_class


def planned_widths(result: dict, model: str, batch: int) -> dict[str, dict[str, int]]:
    """The fp32 widths a ``latency_model.py`` results file planned for ``model`` at ``batch``, by target.

    Example:
        >>> planned_widths({"rows": [{"model": "resnet20", "batch": 64, "precision": "fp32", "ratio": 0.5,
        ...                           "widths": {"conv1": 8}}, {"model": "resnet20", "batch": 1, "ratio": 0.5}]},
        ...                "resnet20", 64)
        {'plan 0.5x': {'conv1': 8}}
    """
    return {f"plan {row['ratio']:.3g}x": row["widths"] for row in result["rows"]
            if row["model"] == model and row["batch"] == batch and row.get("precision") == "fp32" and "widths" in row}


def main() -> None:
    parser = CommandParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--rows", nargs="*", default=["resnet56_target50", "resnet56_target50_uniform"],
                        help="suite rows whose planned widths to profile (the last record of each in --suite)")
    parser.add_argument("--suite", type=Path, default=RESULTS_DIR / "suite_cpu30.jsonl")
    parser.add_argument("--plans", type=Path, default=None, metavar="JSON",
                        help="also profile the fp32 widths a latency_model.py results file planned for --model at --batch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per network")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per table layer")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the end-to-end medians")
    add_output_arguments(parser, "latency_in_context")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    network = calibrated_network(args.model, [torch.randn(16, 3, 32, 32, generator=generator) for _ in range(2)])
    example = torch.zeros(1, 3, 32, 32)
    classifier = [n for n, m in network.named_modules() if isinstance(m, torch.nn.Linear)][-1:]
    space = channel_space(network, example, classifier)
    records = {}
    for line in args.suite.read_text().splitlines():
        record = json.loads(line)
        if record.get("row") in args.rows and record.get("target_plan"):
            records[record["row"]] = record
    widths = {"dense": dict(space.widths), **{row: records[row]["target_plan"]["widths"] for row in args.rows
                                                if row in records}}
    if args.plans is not None:
        widths.update(planned_widths(json.loads(args.plans.read_text()), args.model, args.batch))
    batch = example.expand(args.batch, *example.shape[1:]).contiguous()
    programs = {name: onnx_bytes(slimmed_copy(network, example, kept) if name != "dense" else network, batch)
                for name, kept in widths.items()}
    block = channel_block("onnxruntime", int8=False)
    networks = []
    with exclusive_timing():  # the table, the end-to-end medians and the profiles on a machine kept quiet
        table = LatencyTable("onnxruntime", args.batch, args.threads, None, args.repeats)
        end_to_end = timed_programs(programs, "onnxruntime", args.threads, batch.numpy(), args.repeats, args.rounds)
        for name, kept in widths.items():
            tabled = table_classes(table, space.shapes(kept), block)
            profiled, total = profiled_convolutions(programs[name], batch.numpy(), args.threads, args.calls)
            classes = [{"in": key[0], "out": key[1], "kernel": list(key[2]), "size": list(key[3]), "size_out": list(key[4]),
                        "layers": len(tabled.get(key, ())), "profiled_layers": len(profiled.get(key, ())),
                        "table_ms": sum(tabled.get(key, ())), "in_network_ms": sum(profiled.get(key, ()))}
                       for key in sorted(set(tabled) | set(profiled))]
            networks.append({"name": name, "commit": records.get(name, {}).get("code_version"), "widths": kept,
                             "table_ms": sum(c["table_ms"] for c in classes), "profile_ms": total,
                             "convolutions_in_network_ms": sum(c["in_network_ms"] for c in classes),
                             "measured_ms": end_to_end[name], "classes": classes})
            print(f"{name}: table {networks[-1]['table_ms']:.1f} ms, in the network {total:.1f} ms (profile), "
                  f"{end_to_end[name]:.1f} ms end to end", flush=True)
    result = {"machine": machine_info(), "settings": {**run_settings(args, omit=("suite", "plans")), "block": block,
                                                      "plans": args.plans and args.plans.name},
              "networks": networks}
    write_results(args.name, result, render(result), args.results_dir)


def render(result: dict) -> str:
    """The markdown of a result."""
    settings, machine = result["settings"], result["machine"]
    lines = ["# Per-layer table against the layers inside the network (issue 24)", "",
             (f"{machine_line(machine)}; onnxruntime, {settings['model']}, batch {settings['batch']}, "
             f"{settings['threads']} thread(s), channel block {settings['block']}. Random weights. *table*: the "
             "planner's per-layer latency table (each convolution timed alone, plain NCHW in and out); *in the "
             "network*: onnxruntime's profile of the whole network, each convolution with the layout reorder after "
             "it; *end to end*: interleaved medians of whole calls. Classes: input channels -> output channels as "
             "onnxruntime runs them (padded to its block), kernel, size in -> out. *table / end to end, as fractions "
             "of dense*: the ratio a plan is checked by (the table's milliseconds scale with its reference "
             "convolution, timed once)."), "",
             "| network | table ms | in the network ms (profile) | end to end ms | in the network / table "
             "| table / end to end | as fractions of dense |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    dense = result["networks"][0]
    for network in result["networks"]:
        fractions = (network["table_ms"] / dense["table_ms"]) / (network["measured_ms"] / dense["measured_ms"])
        lines.append(f"| {network['name']} | {network['table_ms']:.2f} | {network['profile_ms']:.2f} | "
                     f"{network['measured_ms']:.2f} | {network['profile_ms'] / network['table_ms']:.2f} | "
                     f"{network['table_ms'] / network['measured_ms']:.2f} | {fractions:.3f} |")
    for network in result["networks"]:
        lines += ["", f"## {network['name']}", "",
                  "| class | layers | table ms | in the network ms | in the network / table |", "|---|---:|---:|---:|---:|"]
        for c in sorted(network["classes"], key=lambda c: -abs(c["in_network_ms"] - c["table_ms"])):
            ratio = f"{c['in_network_ms'] / c['table_ms']:.2f}" if c["table_ms"] else "-"
            count = str(c["layers"]) if c["layers"] == c["profiled_layers"] else f"{c['layers']} ({c['profiled_layers']} profiled)"
            lines.append(f"| {c['in']}->{c['out']} k{c['kernel'][0]} {c['size'][0]}->{c['size_out'][0]} | {count} | "
                         f"{c['table_ms']:.2f} | {c['in_network_ms']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
