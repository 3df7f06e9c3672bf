"""The on-disk cache: archives extracted once and decoded arrays saved once, both atomically.

Entries are keyed by a fingerprint of their source (path, size, modification time).

Example:
    >>> folder = Path(tempfile.mkdtemp()) / "new"
    >>> save_atomic({"x": torch.arange(3)}, folder / "a.pt")
    >>> torch.load(folder / "a.pt")["x"].tolist(), sorted(p.name for p in folder.iterdir())
    ([0, 1, 2], ['a.pt'])
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

from lightning_compress.core.files import atomic_path

CACHE_ENV = "LIGHTNING_COMPRESS_CACHE"
"""Environment variable that overrides the default cache folder."""


def default_cache_dir() -> Path:
    """The cache folder (not created): ``$LIGHTNING_COMPRESS_CACHE`` or ``~/.cache/lightning_compress``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_compress")


def fingerprint(paths: list[Path], *extra: object) -> str:
    """16 hex digits hashing files' resolved paths, sizes, mtimes and ``extra`` settings (e.g. ``resize``)."""
    digest = hashlib.sha256(repr(extra).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path`` (folder created), then rename it to ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def extract_archive(archive: Path, destination: Path) -> Path:
    """Extract a tar archive (any compression) to the folder ``destination`` once, atomically; return it.

    Raises:
        ValueError: If the archive is corrupt or truncated (the message names it); nothing is kept.

    Example:
        >>> extract_archive(Path("/nonexistent.tar"), Path("/tmp/x"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: cannot extract archive /nonexistent.tar: ...
    """
    if destination.is_dir():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"))
    try:
        with tarfile.open(archive, "r:*") as tar:
            # The "data" filter refuses absolute paths, links out of the tree and device files.
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"cannot extract archive {archive}: it is corrupt or truncated ({type(exc).__name__}: {exc}); "
            f"nothing was kept in the cache {destination.parent}"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, destination)
    except OSError:
        # Another process finished the same extraction first: keep its copy.
        shutil.rmtree(tmp, ignore_errors=True)
        if not destination.is_dir():
            raise
    return destination
