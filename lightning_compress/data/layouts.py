"""Where CIFAR comes from: the three accepted ``root`` layouts, prepared once and then loaded fast.

* ``torchvision`` -- a folder holding torchvision's pickled batches (``cifar-10-batches-py/`` or
  ``cifar-100-python/``); downloaded there when missing and ``download=True``.
* ``image_folder`` -- a folder with ``train/<class>/*`` and ``test/<class>/*`` images (optionally
  inside one top-level folder); decoded once and cached as uint8 tensors.
* ``archive`` -- a tar archive (any compression) of such a tree; extracted once into the cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from lightning_compress.data import readers
from lightning_compress.data.cache import extract_archive, fingerprint, save_atomic
from lightning_compress.data.readers import SPECS, CIFARArrays, CIFARSpec  # noqa: F401 (SPECS: doctests)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
"""Names accepted as an archive of an ImageFolder tree."""

SPLITS = ("train", "test")
"""The split folders of an ImageFolder tree."""

_CACHE_FORMAT = 1  # bump when the cached content changes


@dataclass(frozen=True)
class Layout:
    """A located dataset: its ``kind`` and ``path`` (batches folder, tree root or archive file)."""

    kind: Literal["torchvision", "image_folder", "archive"]
    path: Path


def layouts_help(spec: CIFARSpec) -> str:
    """One sentence listing the accepted ``root`` layouts of ``spec``'s dataset, for error messages."""
    return (
        f"root must be (a) torchvision's CIFAR layout: a folder containing '{spec.folder}/' "
        f"(or download=True to fetch it there), (b) an ImageFolder tree: a folder with "
        f"'train/<class>/<image>' and 'test/<class>/<image>', or (c) a {'/'.join(ARCHIVE_SUFFIXES)} "
        f"archive of such a tree"
    )


def find_layout(root: Path, spec: CIFARSpec, download: bool) -> Layout:
    """Which layout ``root`` is (``FileNotFoundError`` if none and not ``download``).

    Example:
        >>> find_layout(Path("/nonexistent"), SPECS["cifar10"], download=True)
        Layout(kind='torchvision', path=PosixPath('/nonexistent/cifar-10-batches-py'))
    """
    if root.name.lower().endswith(ARCHIVE_SUFFIXES) or root.is_file():
        if not root.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise FileNotFoundError(f"root {root} is a file but not an archive; {layouts_help(spec)}")
        if not root.is_file():
            raise FileNotFoundError(f"archive {root} does not exist")
        return Layout("archive", root)
    if (root / spec.folder).is_dir():
        return Layout("torchvision", root / spec.folder)
    tree = find_tree(root)
    if tree is not None:
        return Layout("image_folder", tree)
    if download:
        return Layout("torchvision", root / spec.folder)
    state = "does not exist" if not root.exists() else "holds no CIFAR data"
    raise FileNotFoundError(f"{spec.name} root {root} {state} (download=False); {layouts_help(spec)}")


def find_tree(folder: Path) -> Path | None:
    """The folder holding ``train/`` and ``test/``: ``folder`` itself, its only sub-folder, or ``None``.

    Example:
        >>> find_tree(Path("/nonexistent")) is None
        True
    """

    def is_tree(path: Path) -> bool:
        return all((path / split).is_dir() for split in SPLITS)

    if is_tree(folder):
        return folder
    subfolders = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if len(subfolders) == 1 and is_tree(subfolders[0]):
        return subfolders[0]
    return None


def check_classes(classes: list[str], spec: CIFARSpec, source: Path) -> None:
    """Raise ``ValueError`` naming ``source`` unless ``classes`` are as many as ``spec`` says.

    Example:
        >>> check_classes(["cat", "dog"], SPECS["cifar10"], Path("tree/train"))
        Traceback (most recent call last):
        ...
        ValueError: tree/train has 2 classes (cat, dog) but dataset='cifar10' has 10 classes
    """
    if len(classes) != spec.num_classes:
        shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
        raise ValueError(
            f"{source} has {len(classes)} classes ({shown}) but dataset={spec.name!r} has "
            f"{spec.num_classes} classes"
        )


def prepare_cifar(root: Path, spec: CIFARSpec, download: bool, cache_dir: Path, resize: bool) -> Layout:
    """Download, or extract, decode and cache, once; return the layout. As :func:`load_cifar` otherwise."""
    layout = find_layout(root, spec, download)
    if layout.kind == "torchvision":
        if not layout.path.is_dir():
            spec.torchvision_class(str(root), train=True, download=True)
    else:
        _decoded_path(layout, spec, cache_dir, resize)
    return layout


def load_cifar(root: Path, spec: CIFARSpec, download: bool, cache_dir: Path, resize: bool) -> CIFARArrays:
    """Load a CIFAR dataset from any accepted layout of ``root``, preparing it first if needed.

    Raises:
        FileNotFoundError: If no layout is found.
        ValueError: On a corrupt archive, a class-count mismatch or an image of the wrong size.

    Example:
        >>> load_cifar(Path("/nonexistent"), SPECS["cifar10"], False, Path("/tmp"), False)
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: cifar10 root /nonexistent does not exist (download=False); root must be ...
    """
    layout = prepare_cifar(root, spec, download, cache_dir, resize)
    if layout.kind == "torchvision":
        arrays = readers.read_cifar_pickles(layout.path, spec)
    else:
        arrays = CIFARArrays(**torch.load(_decoded_path(layout, spec, cache_dir, resize), weights_only=True))
    check_classes(arrays.classes, spec, layout.path)
    return arrays


def _decoded_path(layout: Layout, spec: CIFARSpec, cache_dir: Path, resize: bool) -> Path:
    """The cached decoded arrays of an image layout, decoding (and extracting) them if missing."""
    settings = (_CACHE_FORMAT, f"resize={resize}")
    listing = None
    if layout.kind == "archive":
        key = fingerprint([layout.path], *settings)
    else:
        listing = _list_tree(layout.path, spec)
        key = fingerprint([f for files, _, _ in listing.values() for f in files], *settings)
    cached = cache_dir / "decoded" / f"{layout.path.name}-{key}.pt"
    if cached.is_file():
        return cached
    if listing is None:  # an archive: extract it to list its tree
        extracted = extract_archive(layout.path, cache_dir / "extracted" / f"{layout.path.name}-{key}")
        tree = find_tree(extracted)
        if tree is None:
            raise ValueError(
                f"archive {layout.path} holds no 'train/' and 'test/' folders; {layouts_help(spec)}"
            )
        listing = _list_tree(tree, spec)
    (train_files, train_labels, classes), (test_files, test_labels, _) = listing["train"], listing["test"]
    arrays = CIFARArrays(
        train_images=readers.decode_images(train_files, resize),
        train_labels=torch.tensor(train_labels, dtype=torch.int64),
        test_images=readers.decode_images(test_files, resize),
        test_labels=torch.tensor(test_labels, dtype=torch.int64),
        classes=classes,
    )
    save_atomic(asdict(arrays), cached)
    return cached


def _list_tree(tree: Path, spec: CIFARSpec) -> dict[str, tuple[list[Path], list[int], list[str]]]:
    listing = {split: readers.list_image_folder(tree / split) for split in SPLITS}
    train_classes, test_classes = listing["train"][2], listing["test"][2]
    check_classes(train_classes, spec, tree / "train")
    if test_classes != train_classes:
        only_one = sorted(set(test_classes) ^ set(train_classes))
        raise ValueError(
            f"{tree / 'train'} and {tree / 'test'} have different class folders (in only one of them: "
            f"{only_one}); both splits need the same classes"
        )
    return listing
