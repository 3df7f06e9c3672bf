"""``lightning-compress report CHECKPOINT``: the compression report of a saved model."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_compress.commands.checkpoint import NETWORK, LoadedCheckpoint, load_checkpoint
from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.architecture import ArchitectureRecord
from lightning_compress.export import build_network, export_artifacts, int8_from_qat
from lightning_compress.export.runtimes import RUNTIMES, select_artifacts
from lightning_compress.quantization.engines import ENGINE_TABLE, ENGINES, KernelFamily
from lightning_compress.quantization.families import family_of
from lightning_compress.quantization.qat import recorded_inputs
from lightning_compress.report import render_markdown, summarize, write_report


def main(argv: Sequence[str]) -> int:
    """Write ``compression_report.{md,json,png}`` for a checkpoint and print the table.

    Args:
        argv: Command-line arguments after ``report``.

    Returns:
        The exit status.
    """
    parser = CommandParser(
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
    parser.add_argument("--runtime", nargs="*", choices=RUNTIMES, default=None,
                        help="runtimes whose deployed file is built and timed at batch 1, naming the fastest "
                             "(default: every installed one that takes the checkpoint, as export; none: skip)")
    args = parser.parse_args(argv)
    loaded = load_checkpoint(args.checkpoint)
    meta = loaded.metadata
    engine = (meta.get("quantization") or {}).get("engine")
    runtimes = None if args.runtime == [] else select_artifacts(args.runtime, engine)  # refused before any work
    dense = build_network({k: meta[k] for k in ("model", "num_classes", "model_kwargs")})
    example = torch.randn(1, 3, *meta["input_size"])
    int8 = None
    if engine and ENGINE_TABLE[args.engine or engine].family is KernelFamily.PT2E:  # the graph takes its traced shape
        records = [ArchitectureRecord.from_dict(r) for r in meta.get("architecture") or []]
        example = torch.randn_like((recorded_inputs(records, NETWORK) or (example,))[0][:1])
        int8 = family_of(args.engine or engine).convert_qat(loaded.network, (example.repeat(2, 1, 1, 1),), "")
    elif engine:
        int8 = int8_from_qat(loaded.network, args.engine or engine, (example,))
    state = next((v for k, v in loaded.checkpoint.get("callbacks", {}).items() if k.startswith("CompressionReport")), None)
    accuracy = None
    if state and state["accuracy"]["after"] is not None:
        accuracy = {"metric": state["metric"], "source": "first validation -> last validation", **state["accuracy"]}
    summary = summarize(loaded.network, example, dense_network=dense,
                        int8_network=int8, accuracy=accuracy, values=args.values,
                        latency_batch_sizes=args.batch_sizes, latency_repeats=args.latency_repeats,
                        prefix=f"{NETWORK}.")
    summary["sizes"]["checkpoint_bytes"] = loaded.path.stat().st_size
    if runtimes is not None:
        summary["runtimes"] = runtime_latencies(loaded, runtimes, max(args.latency_repeats, 1))
    paths = write_report(summary, args.out or loaded.path.parent)
    print(render_markdown(summary))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def runtime_latencies(loaded: LoadedCheckpoint, artifacts: Sequence[str], repeats: int) -> dict | None:
    """Time the checkpoint's deployed files at batch 1, as ``export`` builds them.

    Args:
        loaded: The checkpoint.
        artifacts: What to build (:func:`~lightning_compress.export.runtimes.select_artifacts`), in a temporary
            folder; checked on noise and never refused (this times them, ``export`` checks them).
        repeats: Timed runs of each.

    Returns:
        The export manifest's ``latency`` (medians, CPU, the fastest runtime), or None if nothing was built.
    """
    with tempfile.TemporaryDirectory() as folder:
        images = torch.randn(16, 3, *loaded.metadata["input_size"], generator=torch.Generator().manual_seed(0))
        result = export_artifacts(loaded.network, loaded.metadata, Path(folder) / "export", images, only=artifacts,
                                  min_agreement=0.0, latency_repeats=repeats)
    return result.manifest.get("latency")
