"""Training segments in processes forked from the caller, for the kill -9 resume tests.

The caller has imported everything and trained nothing; each segment is a fork of it, so a segment that kills
itself costs no interpreter start-up (importing torch and Lightning takes seconds).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch


def in_child(run: Callable[..., object], *args: object) -> int:
    """Call ``run(*args)`` in a forked process.

    Returns:
        Its exit code: 0 when ``run`` returned, 1 when it raised (the traceback printed), ``-9`` when it SIGKILLed
        itself.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            run(*args)
            code = 0
        finally:
            if code:
                traceback.print_exc()  # the exception on its way out: os._exit stops it here
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def killed_chain(run: Callable[[int | None, bool], object], out: Path, kills: tuple[int, ...]) -> list[dict]:
    """``run(kill_at, resume)`` killed at each of ``kills`` in turn, resumed from ``out/last.ckpt`` each time, then
    run to its end.

    Returns:
        What each segment did: ``{"kill_at", "resumed_at" (the checkpoint's step, None at first), "exit"}``.
    """
    segments, resumed_at = [], None
    for kill_at in (*kills, None):
        exit_code = in_child(run, kill_at, resumed_at is not None)
        segments.append({"kill_at": kill_at, "resumed_at": resumed_at, "exit": exit_code})
        if exit_code != -signal.SIGKILL:
            break
        resumed_at = torch.load(out / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    return segments
