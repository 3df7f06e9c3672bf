"""Training throughput (images/s) of each zoo model, channels_last off/on, on CPU and GPU if present.

Each measurement runs full SGD training steps (forward, cross-entropy, backward, optimizer step) of
``ImageClassifier``'s network on a synthetic CIFAR-shaped batch; the two memory formats of one model
are interleaved round by round in the same process so their ratio is fair.

Run:
    python benchmarks/train_throughput.py                   # all models, CPU (+ GPU if available)
    python benchmarks/train_throughput.py --models resnet20 --steps 5 --rounds 2
Writes ``benchmarks/results/train_throughput.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from lightning_compress.commands.parser import CommandParser
from lightning_compress.models import create_model, list_models
from reporting import add_output_arguments, machine_info, write_results


def time_training_steps(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Seconds per training step, averaged over ``steps`` steps after one warm-up step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(batch), labels).backward()
        optimizer.step()

    step()
    if batch.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if batch.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def measure(name: str, device: str, batch_size: int, steps: int, rounds: int) -> dict[str, object]:
    """Images/s of one model on one device, channels_last off and on, interleaved per round."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).to(device).train()
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    seconds: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
    for _ in range(rounds):
        for fmt, memory_format in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            model = model.to(memory_format=memory_format)
            batch = images.contiguous(memory_format=memory_format)
            seconds[fmt].append(time_training_steps(model, batch, labels, steps))
    row: dict[str, object] = {"model": name, "device": device, "batch_size": batch_size}
    for fmt, values in seconds.items():
        row[f"{fmt}_img_per_s"] = round(batch_size / statistics.median(values), 1)
    row["channels_last_speedup"] = round(row["channels_last_img_per_s"] / row["contiguous_img_per_s"], 3)
    return row


def to_markdown(result: dict[str, object]) -> str:
    """Render the result as a markdown table with its settings."""
    lines = [
        "# Training throughput",
        "",
        f"Machine: {result['machine']}",
        f"Settings: {result['settings']}",
        "",
        "| model | device | batch | img/s (contiguous) | img/s (channels_last) | channels_last speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {row['device']} | {row['batch_size']} | {row['contiguous_img_per_s']} | "
            f"{row['channels_last_img_per_s']} | {row['channels_last_speedup']}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    add_output_arguments(parser, "train_throughput")
    args = parser.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for name in args.models:
            row = measure(name, device, args.batch_size, args.steps, args.rounds)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "machine": machine_info(),
        "settings": {"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds},
        "rows": rows,
    }
    write_results(args.name, result, to_markdown(result), directory=args.results_dir)


if __name__ == "__main__":
    main()
