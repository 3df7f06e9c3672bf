"""Atomic file writes: a reader never sees a half-written file, an interruption leaves none behind.

Example:
    >>> import pathlib, tempfile
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    The temporary file has the final file's name inside a hidden temporary directory in the
    destination directory: the final ``os.replace`` is an atomic rename on the same filesystem, and
    writers that record the file name inside the file (``torch.save`` and ``torch.jit.save`` name
    their archive's root folder after it) record the final one. Parent directories are created.

    Args:
        path: The final destination.

    Returns:
        A context manager yielding the temporary path to write to.

    Example:
        >>> # with atomic_path("model.pt") as tmp: torch.save(obj, tmp)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    tmp = staging / final.name
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path: The destination file.
        text: The content.

    Example:
        >>> # write_text_atomic("results.md", "# Results")
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_zip_deflated(archive: bytes, path: str | os.PathLike[str]) -> None:
    """Write the zip ``archive`` to ``path`` atomically, every record deflated.

    Record names, order and times are kept, so readers that look records up by name (``torch.load``,
    ``torch.jit.load``, LibTorch) read the result as they read the original, which ``torch.save`` and
    ``torch.jit.save`` write uncompressed.

    Args:
        archive: The bytes of a zip archive.
        path: The destination file.

    Example:
        >>> # buffer = io.BytesIO(); torch.jit.save(module, buffer)
        >>> # write_zip_deflated(buffer.getvalue(), "model.pt")
    """
    with atomic_path(path) as tmp, zipfile.ZipFile(io.BytesIO(archive)) as source, \
            zipfile.ZipFile(tmp, "w") as target:
        for record in source.infolist():
            target.writestr(zipfile.ZipInfo(record.filename, record.date_time), source.read(record),
                            compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
