"""A machine-wide lock that keeps latency measurements from overlapping with each other, or with work that yields.

Two processes timing at once on one machine slow each other unevenly (memory-bound layers more than
compute-bound ones), so a ratio measured beside another measurement is not the ratio measured alone.
Every latency measurement of the package holds the lock exclusively (:func:`exclusive_timing`); a process
that wants the machine quiet for them holds it shared while it works (:func:`shared_timing`: the suite's
training steps do) and so pauses while another process measures. The lock is a file under the temporary
folder (``$LIGHTNING_COMPRESS_TIMING_LOCK`` names another); re-entrant within a process; where ``fcntl`` is
missing (Windows) it does nothing.

Example:
    >>> with shared_timing(), exclusive_timing():  # a training step of this process that measures
    ...     held_mode()
    'exclusive'
    >>> held_mode() is None
    True
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks; measurements are then only as quiet as the machine
    fcntl = None

LOCK_ENVIRONMENT = "LIGHTNING_COMPRESS_TIMING_LOCK"
"""Environment variable naming the lock file (default: ``lightning_compress-timing-<user id>.lock`` in the
temporary folder)."""


def lock_path() -> Path:
    """The lock file: ``$LIGHTNING_COMPRESS_TIMING_LOCK``, else one per user in the temporary folder."""
    named = os.environ.get(LOCK_ENVIRONMENT)
    if named:
        return Path(named)
    return Path(tempfile.gettempdir()) / f"lightning_compress-timing-{getattr(os, 'getuid', lambda: 0)()}.lock"


class _ProcessLock:
    """This process's hold on one lock file: a stack of the modes asked for, one open file for all of them.

    A measurement waiting for the lock is not starved by shared holders taking turns (two training rows whose
    steps overlap would never leave the lock free together): every change of hold passes a turnstile, a second
    file that a waiting measurement holds exclusively, so new shared holds queue behind it while the current
    ones finish. A process never holds the lock while it waits at the turnstile (a hold changing mode, growing
    exclusive or back to shared, gives the lock up first), so two processes cannot wait for each other.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.modes: list[str] = []
        self.handle = None

    def _set(self, mode: str | None) -> None:
        if fcntl is None:
            return
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a")  # noqa: SIM115 - held across calls, closed when released
        if mode is None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
            return
        exclusive = mode == "exclusive"
        # never wait at the turnstile holding the lock: a waiting measurement holds the turnstile until it has the lock
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        with open(self.path.with_name(self.path.name + ".turnstile"), "a") as turnstile:
            fcntl.flock(turnstile, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            fcntl.flock(self.handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    def strongest(self) -> str | None:
        return "exclusive" if "exclusive" in self.modes else (self.modes[0] if self.modes else None)

    @contextlib.contextmanager
    def held(self, mode: str) -> Iterator[None]:
        before = self.strongest()
        self.modes.append(mode)
        during = self.strongest()
        if during != before:
            self._set(during)
        try:
            yield
        finally:
            self.modes.pop()
            if during != before:
                self._set(before)


_LOCKS: dict[Path, _ProcessLock] = {}


def _lock() -> _ProcessLock:
    path = lock_path()
    if path not in _LOCKS:
        _LOCKS[path] = _ProcessLock(path)
    return _LOCKS[path]


def exclusive_timing() -> contextlib.AbstractContextManager[None]:
    """Hold the timing lock alone: wait for other measurements and for work holding it shared, keep them waiting."""
    return _lock().held("exclusive")


def shared_timing() -> contextlib.AbstractContextManager[None]:
    """Hold the timing lock beside other shared holders: wait while a measurement holds it, delay the next one."""
    return _lock().held("shared")


def held_mode() -> str | None:
    """What this process holds: ``"exclusive"``, ``"shared"`` or ``None``."""
    return _lock().strongest()


__all__ = ["LOCK_ENVIRONMENT", "exclusive_timing", "held_mode", "lock_path", "shared_timing"]
