"""``lightning-compress report CHECKPOINT``: the compression report of a saved model."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from lightning_compress.commands.checkpoint import NETWORK, load_checkpoint
from lightning_compress.export import build_network, int8_from_qat
from lightning_compress.quantization.engines import ENGINES
from lightning_compress.report import render_markdown, summarize, write_report


def main(argv: Sequence[str]) -> int:
    """Write ``compression_report.{md,json,png}`` for a checkpoint and print the table.

    Args:
        argv: Command-line arguments after ``report``.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-compress report",
        description="Per-layer sparsity/bits/MACs, sizes (fp32 vs packed), CPU latency (dense fp32 vs compressed) "
                    "and accuracy (when the run used CompressionReport) of an ImageClassifier checkpoint.")
    parser.add_argument("checkpoint", help="ImageClassifier checkpoint (.ckpt)")
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--values", choices=["int8", "fp16"], default="int8", help="packed value format")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="int8 engine to time a QAT checkpoint's int8 model with (default: the one it trained "
                             "for; onnxruntime engines time the QDQ ONNX model in onnxruntime)")
    parser.add_argument("--latency-repeats", type=int, default=10, help="timed runs per model and batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 64], help="latency batch sizes")
    args = parser.parse_args(argv)
    loaded = load_checkpoint(args.checkpoint)
    meta = loaded.metadata
    dense = build_network({k: meta[k] for k in ("model", "num_classes", "model_kwargs")})
    example = torch.randn(1, 3, *meta["input_size"])
    int8 = None
    if meta["quantization"]:
        int8 = int8_from_qat(loaded.network, args.engine or meta["quantization"]["engine"], (example,))
    state = next((v for k, v in loaded.checkpoint.get("callbacks", {}).items() if k.startswith("CompressionReport")), None)
    accuracy = None
    if state and state["accuracy"]["after"] is not None:
        accuracy = {"metric": state["metric"], "source": "first validation -> last validation", **state["accuracy"]}
    summary = summarize(loaded.network, example, dense_network=dense,
                        int8_network=int8, accuracy=accuracy, values=args.values,
                        latency_batch_sizes=args.batch_sizes, latency_repeats=args.latency_repeats,
                        prefix=f"{NETWORK}.")
    summary["sizes"]["checkpoint_bytes"] = loaded.path.stat().st_size
    paths = write_report(summary, args.out or loaded.path.parent)
    print(render_markdown(summary))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0
