"""``lightning-compress export CHECKPOINT --to DIR``: write every deployable artifact of a checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from lightning_compress.commands.checkpoint import load_checkpoint
from lightning_compress.export import FILES, check_export_directory, export_artifacts, int8_from_qat
from lightning_compress.quantization.backend import ENGINES


def main(argv: Sequence[str]) -> int:
    """Export packed weights, ONNX (verified with onnxruntime) and, for QAT checkpoints, the int8 model.

    Args:
        argv: Command-line arguments after ``export``.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-compress export",
        description=f"Write {FILES['packed']} (packed sparse weights), {FILES['onnx_fp32']} (fp32 checkpoints), "
                    f"{FILES['int8']} and {FILES['onnx_int8']} (QAT checkpoints) and manifest.json into DIR. "
                    "ONNX models are checked with onnxruntime (top-1 agreement >= --min-agreement on random images). "
                    "Nothing is written unless every artifact succeeds.")
    parser.add_argument("checkpoint", help="ImageClassifier checkpoint (.ckpt)")
    parser.add_argument("--to", required=True, dest="directory", help="export directory (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace the content of a non-empty directory")
    parser.add_argument("--values", choices=["int8", "fp16"], default="int8", help="packed value format")
    parser.add_argument("--engine", choices=ENGINES, default="x86", help="int8 engine of a QAT checkpoint")
    parser.add_argument("--classes", default=None, help="comma-separated class names, in label order")
    parser.add_argument("--check-images", type=int, default=64, help="random images for the onnxruntime check")
    parser.add_argument("--min-agreement", type=float, default=0.99, help="minimal ONNX-vs-torch top-1 agreement")
    args = parser.parse_args(argv)
    check_export_directory(args.directory, args.overwrite)  # fail before loading anything
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    loaded = load_checkpoint(args.checkpoint, engine=args.engine, classes=classes)
    meta = loaded.metadata
    images = torch.randn(args.check_images, 3, *meta["input_size"], generator=torch.Generator().manual_seed(0))
    int8 = int8_from_qat(loaded.network, args.engine) if meta["quantization"] else None
    result = export_artifacts(loaded.network, meta, args.directory, images, int8_network=int8, values=args.values,
                              overwrite=args.overwrite, min_agreement=args.min_agreement)
    for key, entry in result.manifest["files"].items():
        print(f"{result.directory / entry['name']}: {entry['bytes']:,} bytes")
    for key, agreement in result.manifest["checks"].items():
        print(f"check {key}: {agreement:.1%}")
    for key, reason in result.manifest["skipped"].items():
        print(f"skipped {key}: {reason}")
    return 0
