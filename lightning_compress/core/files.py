"""Atomic file writes: a reader never sees a half-written file, an interruption leaves none behind.

Example:
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
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

    The temporary file keeps the final name (inside a hidden folder in the destination folder), since
    ``torch.save`` and ``torch.jit.save`` record it in the archive. Parent folders are created.
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
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_zip_deflated(archive: bytes, path: str | os.PathLike[str]) -> None:
    """Write the zip ``archive`` (bytes) to ``path`` atomically, every record deflated.

    Record names, order and times are kept, so ``torch.load``, ``torch.jit.load`` and LibTorch read
    the result as they read the uncompressed original.
    """
    with atomic_path(path) as tmp, zipfile.ZipFile(io.BytesIO(archive)) as source, \
            zipfile.ZipFile(tmp, "w") as target:
        for record in source.infolist():
            target.writestr(zipfile.ZipInfo(record.filename, record.date_time), source.read(record),
                            compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
