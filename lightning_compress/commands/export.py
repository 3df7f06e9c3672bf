"""``lightning-compress export CHECKPOINT --to DIR``: write every deployable artifact of a checkpoint, each checked."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_compress.commands.checkpoint import load_checkpoint
from lightning_compress.commands.parser import CommandParser
from lightning_compress.commands.predict import IMAGE_SUFFIXES, read_image
from lightning_compress.core.onnx import require_onnx
from lightning_compress.export import ARTIFACTS, FILES, check_export_directory, export_artifacts
from lightning_compress.export.artifacts import check_artifacts
from lightning_compress.export.runtimes import RUNTIMES, select_artifacts
from lightning_compress.export.sample import stratified_sample


def check_count(value: str) -> int | None:
    """``--check-count``: a positive number of images, or ``all`` (None).

    Example:
        >>> check_count("all"), check_count("500")
        (None, 500)
    """
    if value == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a number >= 1 or 'all', got {value!r}")
    return count


def check_images(metadata: dict[str, Any], checkpoint: dict[str, Any], data_root: str | None, images_dir: str | None,
                 count: int | None, cache_dir: str | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, str, dict[str, Any]]:
    """Real images to check the artifacts on: a seeded, class-stratified sample of the datamodule's test split or
    of an image folder (stratified by sub-folder), or random noise.

    Args:
        metadata: The checkpoint's metadata (input size, normalization).
        checkpoint: The raw checkpoint (its recorded datamodule root and dataset).
        data_root: ``--data-root``; else the root the checkpoint recorded, if it exists here.
        images_dir: ``--check-images``: a folder of image files (no labels).
        count: How many images; None: all of them.
        cache_dir: CIFARDataModule cache folder.
        seed: Seed of the sample.

    Returns:
        ``(images, labels or None, description of the source, how the sample was drawn)``.

    Raises:
        ValueError: If ``images_dir`` holds no image, or ``count < 1``.
    """
    if count is not None and count < 1:
        raise ValueError(f"--check-count must be >= 1 or 'all', got {count}")
    recorded = checkpoint.get("datamodule_hyper_parameters") or {}
    root = data_root or (recorded.get("root") if recorded.get("root") and Path(recorded["root"]).exists() else None)
    if images_dir is None and root is not None:
        from lightning_compress.data import CIFARDataModule

        data = CIFARDataModule(root, dataset=recorded.get("dataset", "cifar10"), download=False, val_size=0,
                               cache_dir=cache_dir)
        data.setup("test")
        split = data.test_set
        sample = stratified_sample(split.labels, count, seed, names=data.classes)
        images, labels = split.__getitems__(sample.indices.tolist())
        return data.transform(images, train=False).float().cpu(), labels, f"test split of {root}", sample.to_dict()
    if images_dir is not None:
        folder = Path(images_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"--check-images {folder} is not a directory")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--check-images {folder} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        folders = sorted({str(f.parent.relative_to(folder)) for f in files})
        sample = stratified_sample([folders.index(str(f.parent.relative_to(folder))) for f in files], count, seed,
                                   names=folders, grouped_by="folder")
        files = [files[i] for i in sample.indices.tolist()]
        images = torch.stack([read_image(f, metadata["input_size"], metadata["mean"], metadata["std"]) for f in files])
        return images, None, f"images in {folder}", sample.to_dict()
    size = 256 if count is None else min(count, 256)
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 3, *metadata["input_size"], generator=generator), None,
            "random (no data root recorded or given, no --check-images): agreement on noise",
            {"method": "random noise", "seed": seed, "size": size})


def main(argv: Sequence[str]) -> int:
    """Export a checkpoint for the runtimes asked for (default: every installed one that takes it), each checked.

    Args:
        argv: Command-line arguments after ``export``.

    Returns:
        0 if every selected artifact was written or does not apply, 1 if one failed (the others are
        still written; the manifest says why).
    """
    parser = CommandParser(
        prog="lightning-compress export",
        description=f"Write the checkpoint's model for each runtime into DIR: {FILES['packed']} (packed sparse "
                    f"weights), {FILES['onnx_fp32']} or {FILES['onnx_int8']} (QAT checkpoints: the int8 QDQ model, "
                    "built from the learned quantization parameters) for onnxruntime and OpenVINO, "
                    f"{FILES['aoti']} (AOTInductor: fp32, or engine x86_inductor's int8 graph), "
                    f"{FILES['torchscript_int8']} (torch's int8 engines), and manifest.json. Each model is checked "
                    "in its runtime against the checkpoint's network on real images (a seeded, class-stratified "
                    "sample of the datamodule's test split, or of --check-images) and timed at batch 1; one that "
                    "fails is left out and the others are written; manifest.json says which and why, how the check "
                    "images were drawn, and which runtime was fastest on this CPU.")
    parser.add_argument("checkpoint", help="ImageClassifier checkpoint (.ckpt)")
    parser.add_argument("--to", required=True, dest="directory", help="export directory (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace the content of a non-empty directory")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=None,
                        help="runtimes to export for (default: every installed one that takes the checkpoint; "
                             "aoti for fp32 checkpoints and torch only when named)")
    choice.add_argument("--only", nargs="+", choices=ARTIFACTS, default=None, help="artifacts to write")
    parser.add_argument("--values", choices=["int8", "fp16"], default="int8", help="packed value format")
    parser.add_argument("--classes", default=None, help="comma-separated class names, in label order")
    parser.add_argument("--data-root", default=None, help="CIFARDataModule root for the check (default: recorded)")
    parser.add_argument("--cache-dir", default=None, help="CIFARDataModule cache folder")
    parser.add_argument("--check-images", default=None,
                        help="folder of image files to check on (no data root); sampled per sub-folder")
    parser.add_argument("--check-count", type=check_count, default=1000, metavar="N|all",
                        help="images to check on: a seeded sample in which every class keeps its share of the test "
                             "split, or 'all' for the whole split (default: 1000)")
    parser.add_argument("--check-seed", type=int, default=0, help="seed of the check sample (default: %(default)s)")
    parser.add_argument("--min-agreement", type=float, default=0.95,
                        help="near-tie tolerant agreement below which an artifact is refused")
    parser.add_argument("--tolerance", type=float, default=0.05, help="near-tie tolerance (fraction of logit range)")
    parser.add_argument("--latency-repeats", type=int, default=20,
                        help="timed batch-1 runs of each model, interleaved, one thread (0: not timed)")
    args = parser.parse_args(argv)
    if args.latency_repeats < 0:
        parser.error(f"--latency-repeats must be >= 0, got {args.latency_repeats}")
    if args.only is not None:
        check_artifacts(args.only)
        if any(name.startswith("onnx") or name == "openvino" for name in args.only):
            require_onnx("export of ONNX models")
    check_export_directory(args.directory, args.overwrite)  # fail before loading anything
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    loaded = load_checkpoint(args.checkpoint, classes=classes)
    engine = (loaded.metadata.get("quantization") or {}).get("engine")
    selected = check_artifacts(args.only) if args.only is not None else select_artifacts(args.runtime, engine)
    images, labels, source, sample = check_images(loaded.metadata, loaded.checkpoint, args.data_root,
                                                  args.check_images, args.check_count, args.cache_dir, args.check_seed)
    result = export_artifacts(loaded.network, loaded.metadata, args.directory, images, labels, source,
                              only=selected, values=args.values, overwrite=args.overwrite,
                              min_agreement=args.min_agreement, tolerance=args.tolerance, sample=sample,
                              latency_repeats=args.latency_repeats)
    groups = sample.get("per_class") or sample.get("per_folder")
    drawn = f" ({sample['method']}, seed {sample['seed']}: {min(groups.values())}-{max(groups.values())} per " \
            f"{'class' if 'per_class' in sample else 'folder'})" if sample["method"] == "stratified" else ""
    print(f"checked on {len(images)} {source}{drawn}")
    for name, entry in result.manifest["artifacts"].items():
        line = f"{name}: {entry['status']}"
        if entry["status"] == "written":
            line += f" {result.directory / entry['file']} ({entry['bytes']:,} bytes)"
        check = entry.get("parity")
        if check:
            line += f", agreement {check['agreement']:.1%} (top-1 {check['top1_agreement']:.1%})"
            if check["accuracy"] is not None:
                line += f", accuracy {check['accuracy']:.2%} (model {check['reference_accuracy']:.2%})"
        if "reason" in entry:
            line += f": {entry['reason']}"
        print(line)
    latency = result.manifest.get("latency")
    if latency:
        timed = ", ".join(f"{name} {ms:.3g} ms" for name, ms in latency["median_ms"].items())
        print(f"batch 1, 1 thread, {latency['cpu']['model']}: {timed}; fastest: {latency['fastest']['runtime']}")
    return 1 if result.failed() else 0
