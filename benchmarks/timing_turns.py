"""How reproducible a measured latency ratio is, timed in blocks or call by call (issue 24).

The planner's checks and the fit-end measurement compare a planned network with the dense one in interleaved
rounds. On a machine whose speed drifts within seconds, a round that times each network in a block of calls
compares the two at different speeds; taking turns call by call
(:func:`~lightning_compress.planning.latency.round_medians`) compares them at the same moments. This measures the
ratio of a network at half its channels (every group at half its width, at least 8) to the dense one, several
times one after another each way (blocks and turns alternating), in onnxruntime, and reports each way's spread.

Run:  python benchmarks/timing_turns.py                      (ResNet-56, batch 1 and 64, 6 measurements each way)
      python benchmarks/timing_turns.py --model resnet20 --batches 8 --measurements 2 --repeats 3 --rounds 2
Writes ``benchmarks/results/timing_turns.{json,md}``.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from deploy_latency import calibrated_network
from reporting import add_output_arguments, machine_info, machine_line, run_settings, write_results

from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.onnx import onnx_bytes
from lightning_compress.core.timing_lock import exclusive_timing
from lightning_compress.planning.latency import round_medians, runtime_runner
from lightning_compress.planning.widths import channel_space, slimmed_copy


def block_medians(calls: Mapping[str, Callable[[], Any]], repeats: int, rounds: int) -> dict[str, list[float]]:
    """Each call's median milliseconds per round, each timed in a block of ``repeats`` calls (after 3 untimed),
    the blocks' order reversed every other round: the way rounds were timed before turns."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            for _ in range(3):
                calls[name]()
            samples = []
            for _ in range(repeats):
                begin = time.perf_counter()
                calls[name]()
                samples.append(time.perf_counter() - begin)
            times[name].append(statistics.median(samples) * 1e3)
    return times


def main() -> None:
    parser = CommandParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--measurements", type=int, default=6, help="measurements of the ratio each way")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per network per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser, "timing_turns")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    network = calibrated_network(args.model, [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))])
    example = torch.zeros(1, 3, 32, 32)
    classifier = [n for n, m in network.named_modules() if isinstance(m, torch.nn.Linear)][-1:]
    space = channel_space(network, example, classifier)
    half = slimmed_copy(network, example, {group: max(8, width // 2) for group, width in space.widths.items()})
    begin, rows = time.time(), []
    for batch_size in args.batches:
        batch = example.expand(batch_size, 3, 32, 32).contiguous()
        calls = {name: functools.partial(runtime_runner(onnx_bytes(net, batch), "onnxruntime", args.threads),
                                         batch.numpy()) for name, net in (("dense", network), ("half", half))}
        ratios: dict[str, list[float]] = {"blocks": [], "turns": []}
        for _ in range(args.measurements):
            for way, timed in (("blocks", block_medians), ("turns", round_medians)):
                with exclusive_timing():
                    medians = {name: statistics.median(ms) for name, ms in timed(calls, args.repeats,
                                                                                   args.rounds).items()}
                ratios[way].append(medians["half"] / medians["dense"])
        row = {"batch": batch_size, "ratios": ratios,
               "spread": {way: (max(r) - min(r)) / statistics.median(r) for way, r in ratios.items()}}
        rows.append(row)
        print(f"batch {batch_size}: " + "; ".join(f"{way} {min(r):.3f}-{max(r):.3f} (spread {row['spread'][way]:.1%})"
                                                  for way, r in ratios.items()), flush=True)
    result = {"machine": machine_info(), "settings": run_settings(args), "rows": rows,
              "wall_seconds": round(time.time() - begin, 1)}
    write_results(args.name, result, render(result), args.results_dir)


def render(result: dict) -> str:
    machine, settings = result["machine"], result["settings"]
    lines = ["# Timing a latency ratio: blocks or turns (issue 24)", "",
             (f"{machine_line(machine)}, onnxruntime, {settings['threads']} thread(s). {settings['model']} with every channel group at half its"
              f" width (at least 8) against the dense network, random weights; each measurement {settings['rounds']}"
              f" rounds x {settings['repeats']} calls per network, the two ways alternating, one after another. "
              "*spread*: (largest - smallest) / median of the measurements."), "",
             "| batch | way | ratios measured | spread |", "|---:|---|---|---:|"]
    for row in result["rows"]:
        for way, ratios in row["ratios"].items():
            lines.append(f"| {row['batch']} | {way} | {', '.join(f'{r:.3f}' for r in ratios)} | "
                         f"{row['spread'][way]:.1%} |")
    lines += ["", f"Wall time {result['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
