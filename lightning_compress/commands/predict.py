"""``lightning-compress predict --model FILE IMAGES...``: classify image files with an exported model."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lightning_compress.commands.parser import CommandParser
from lightning_compress.export import load_artifact

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
"""Image file types that ``export --check-images`` picks up from a folder."""


def read_image(path: str | Path, size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An image file of any size and mode as a normalized ``(3, H, W)`` tensor of the model's input size.

    Args:
        path: The image file.
        size: ``(height, width)`` of the model input.
        mean: Per-channel mean (in ``[0, 1]``).
        std: Per-channel standard deviation.

    Returns:
        The normalized image.

    Raises:
        ValueError: If the file cannot be read as an image.

    Example:
        >>> read_image("missing.png", (32, 32), (0.5,) * 3, (0.25,) * 3)
        Traceback (most recent call last):
        ...
        ValueError: cannot read image missing.png: No such file or directory
    """
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
    except FileNotFoundError:
        raise ValueError(f"cannot read image {path}: No such file or directory") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def main(argv: Sequence[str]) -> int:
    """Print the top-k classes and probabilities of each image; unreadable files are named and skipped.

    Args:
        argv: Command-line arguments after ``predict``.

    Returns:
        0, or 1 if any image could not be read.
    """
    parser = CommandParser(
        prog="lightning-compress predict",
        description="Classify image files (any size; resized to the model input, normalized as in training) with "
                    "a model written by `lightning-compress export`. With --model this is this command; without "
                    "it, `lightning-compress predict` is LightningCLI's predict over a datamodule.")
    parser.add_argument("--model", required=True, help="export directory, weights.lcpk, an .onnx file or model_int8.pt")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--top-k", type=int, default=3, help="classes to print per image")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    artifact = load_artifact(args.model)
    meta = artifact.metadata
    failed = 0
    for path in args.images:
        try:
            image = read_image(path, meta["input_size"], meta["mean"], meta["std"])
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        probs = torch.softmax(artifact.logits(image.unsqueeze(0)).float(), dim=1)[0]
        top = probs.topk(min(args.top_k, probs.numel()))
        ranked = ", ".join(f"{meta['classes'][i]} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path}: {ranked}")
    if failed:
        print(f"{failed} of {len(args.images)} images could not be read", file=sys.stderr)
    return 1 if failed else 0
