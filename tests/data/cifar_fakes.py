"""Tiny CIFAR-like datasets written in each exact on-disk format the DataModule reads.

Every image is distinct (random pixels from a seeded generator), so tests can identify samples.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def random_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """``n`` random RGB images, ``n x size x size x 3`` uint8."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_cifar_pickles(root: Path, dataset: str = "cifar10", per_batch: int = 4, n_test: int = 6) -> dict:
    """Write torchvision's layout: its folder, file names and pickled dicts (as Python 2 wrote them).

    Returns:
        ``{"train": (images NHWC, labels), "test": (...), "classes": [...]}`` that were written.
    """
    tv = CIFAR10 if dataset == "cifar10" else CIFAR100
    folder = root / tv.base_folder
    folder.mkdir(parents=True)
    num_classes = 10 if dataset == "cifar10" else 100
    label_key = "labels" if dataset == "cifar10" else "fine_labels"
    classes = CIFAR10_CLASSES if dataset == "cifar10" else [f"class{i:03d}" for i in range(100)]
    written: dict = {"classes": classes}
    rng = np.random.default_rng(1)
    for split, files, n in (("train", tv.train_list, per_batch), ("test", tv.test_list, n_test)):
        all_images, all_labels = [], []
        for i, (name, _md5) in enumerate(files):
            images = random_images(n, seed=(0 if split == "train" else 1000) + i)
            labels = rng.integers(0, num_classes, n).tolist()
            entry = {
                "batch_label": f"{split} batch {i}",
                label_key: labels,
                "data": images.transpose(0, 3, 1, 2).reshape(n, -1),  # rows of R, G, B planes
                "filenames": [f"img_{split}_{i}_{j}.png" for j in range(n)],
            }
            if dataset == "cifar100":
                entry["coarse_labels"] = [label // 5 for label in labels]
            with open(folder / name, "wb") as f:
                pickle.dump(entry, f, protocol=2)
            all_images.append(images)
            all_labels.extend(labels)
        written[split] = (np.concatenate(all_images), all_labels)
    with open(folder / tv.meta["filename"], "wb") as f:
        pickle.dump({tv.meta["key"]: classes, "num_cases_per_batch": per_batch}, f, protocol=2)
    return written


def write_image_tree(
    root: Path,
    classes: list[str] = CIFAR10_CLASSES,
    n_train: int = 3,
    n_test: int = 2,
    fmt: str = "png",
    size: int = 32,
) -> dict:
    """Write an ImageFolder tree ``root/{train,test}/<class>/NNNN.<fmt>`` with PIL.

    Returns:
        ``{split: (images NHWC in sorted class/file order, labels)}``.
    """
    written = {}
    for s, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images = random_images(n * len(classes), seed=100 + s, size=size)
        labels = []
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(n):
                Image.fromarray(images[label * n + j]).save(folder / f"{j:04d}.{fmt}")
                labels.append(label)
        written[split] = (images, labels)
    return written


def write_tarball(tree: Path, archive: Path, top_folder: str | None = None) -> Path:
    """Pack ``tree``'s ``train/`` and ``test/`` into a tar archive (compression from the suffix)."""
    mode = "w:gz" if archive.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(archive, mode) as tar:
        for split in ("train", "test"):
            tar.add(tree / split, arcname=f"{top_folder}/{split}" if top_folder else split)
    return archive
