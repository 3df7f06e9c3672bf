"""Work in processes forked from the caller: training segments of the kill -9 resume tests, benchmark scripts.

The caller has imported everything and trained nothing; each piece of work is a fork of it, so it costs no
interpreter start-up (importing torch and Lightning takes seconds).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch


def in_child(run: Callable[..., int | None], *args: object, timeout: float | None = None) -> int:
    """Call ``run(*args)`` in a forked process.

    Args:
        run: The work; what it returns, if an int, is the process's exit status.
        args: Its arguments.
        timeout: Seconds until the process is SIGKILLed (None: no limit).

    Returns:
        Its exit code: what ``run`` returned (0 for None), 1 when it raised (the traceback printed), ``-9`` when it
        was SIGKILLed (by itself or at the timeout).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = run(*args) or 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if timeout is None:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    deadline = time.monotonic() + timeout
    while not (finished := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    return os.waitstatus_to_exitcode(finished[1])


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
