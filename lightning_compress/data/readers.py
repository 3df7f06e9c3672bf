"""Readers of torchvision's pickled CIFAR batches and ImageFolder trees, into uint8 ``N x 3 x 32 x 32``."""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
"""File suffixes (lower case) read as images in an ImageFolder tree; other files are ignored."""

IMAGE_SIZE = 32
"""CIFAR images are ``IMAGE_SIZE x IMAGE_SIZE`` RGB."""


@dataclass(frozen=True)
class CIFARSpec:
    """What distinguishes CIFAR-10 from CIFAR-100: name, classes, per-channel mean/std in ``[0, 1]``, and
    torchvision's dataset class (its file names, label keys and downloader)."""

    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: type[CIFAR10]

    @property
    def folder(self) -> str:
        """The folder of pickled batches in torchvision's layout, e.g. ``cifar-10-batches-py``."""
        return self.torchvision_class.base_folder


SPECS: dict[str, CIFARSpec] = {
    "cifar10": CIFARSpec("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10),
    "cifar100": CIFARSpec("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), CIFAR100),
}
"""The supported datasets by name."""


@dataclass
class CIFARArrays:
    """A decoded dataset: uint8 ``N x 3 x 32 x 32`` images, int64 labels per split; class names by label."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def read_cifar_pickles(folder: Path, spec: CIFARSpec) -> CIFARArrays:
    """Read torchvision's pickled CIFAR batches from ``folder`` (no checksum: any file in that format passes).

    Raises:
        FileNotFoundError: If a batch file is missing (the message names it).
        ValueError: If a batch file is not a CIFAR pickle (the message names it).

    Example:
        >>> read_cifar_pickles(Path("/nonexistent"), SPECS["cifar10"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: ...data_batch_1...
    """
    tv = spec.torchvision_class

    def load(name: str, keys: tuple[str, ...]) -> dict:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR batch file {path} is missing")
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            missing = [k for k in keys if k not in entry]
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path} is not a CIFAR pickle batch: {exc}") from exc
        if missing:
            raise ValueError(f"{path} is not a CIFAR pickle batch: keys {missing} are missing")
        return entry

    label_key = "labels" if tv is CIFAR10 else "fine_labels"

    def split(file_list: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        entries = [load(name, ("data", label_key)) for name, _md5 in file_list]
        images = np.concatenate([np.asarray(e["data"], dtype=np.uint8) for e in entries])
        labels = np.concatenate([np.asarray(e[label_key], dtype=np.int64) for e in entries])
        shape = (-1, 3, IMAGE_SIZE, IMAGE_SIZE)
        return torch.from_numpy(images.reshape(shape).copy()), torch.from_numpy(labels)

    train_images, train_labels = split(tv.train_list)
    test_images, test_labels = split(tv.test_list)
    classes = list(load(tv.meta["filename"], (tv.meta["key"],))[tv.meta["key"]])
    return CIFARArrays(train_images, train_labels, test_images, test_labels, classes)


def list_image_folder(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    """``(files, labels, classes)`` of an ImageFolder split ``<split_dir>/<class>/<image>``, all sorted.

    Raises:
        ValueError: If the folder has no class folders or a class folder has no images.

    Example:
        >>> import tempfile
        >>> split = Path(tempfile.mkdtemp())
        >>> for name in ("dog", "cat"):
        ...     (split / name).mkdir()
        ...     Image.new("RGB", (32, 32)).save(split / name / "0001.png")
        >>> files, labels, classes = list_image_folder(split)
        >>> [f.parent.name for f in files], labels, classes
        (['cat', 'dog'], [0, 1], ['cat', 'dog'])
    """
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise ValueError(f"ImageFolder split {split_dir} has no class folders")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        images = sorted(
            entry.path
            for entry in os.scandir(split_dir / name)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not images:
            raise ValueError(f"class folder {split_dir / name} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(Path(p) for p in images)
        labels.extend([label] * len(images))
    return files, labels, classes


def decode_images(files: list[Path], resize: bool = False, threads: int | None = None) -> torch.Tensor:
    """Decode image ``files``, in order, into one uint8 RGB ``N x 3 x 32 x 32`` tensor on ``threads`` threads.

    Raises ``ValueError`` naming a file that cannot be decoded, or is not 32x32 unless ``resize`` (bicubic).

    Example:
        >>> decode_images([]).shape
        torch.Size([0, 3, 32, 32])
    """
    if not files:
        return torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        arrays = list(pool.map(lambda path: _decode(path, resize), files, chunksize=64))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _decode(path: Path, resize: bool) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except OSError as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        if not resize:
            width, height = rgb.size
            raise ValueError(
                f"image {path} is {width}x{height}, not {IMAGE_SIZE}x{IMAGE_SIZE}; "
                f"pass resize=True to resize every image to {IMAGE_SIZE}x{IMAGE_SIZE}"
            )
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)
