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
import os
import shutil
import tempfile
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
