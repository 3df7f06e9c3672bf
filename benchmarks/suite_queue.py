"""The suite's queue (``suite.py --jobs N``): rows run side by side, each in its own process, dependencies first.

Each row runs as ``suite.py --only <row> --threads 1`` (the command a user would type for that row), so a
row's process appends its own JSON line and regenerates ``RESULTS.md`` as it lands (under the results
file's lock); the queue only decides what starts when: the first queued row whose needs have landed
(the KD rows wait for the teacher). Stopping the queue stops its rows; what landed stays, and the same
command later skips it. :func:`estimate_s` and :func:`schedule` give the plan printed at the start.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from suite_rows import ROWS, Budget, code_version, train_steps

if TYPE_CHECKING:
    from suite import Suite

EPOCH_S = 70.0
"""Seconds per CIFAR-10 epoch (45,000 images, batch 128) of the dense ResNet-20 with bf16 autocast, one
process with one torch thread, two such processes side by side on the 2-core EPYC (issue 25: ~72 s)."""
FP32_SLOWDOWN = 1.7
"""fp32 training time over bf16 autocast on that CPU (961 vs 1,638 images/s, RESULTS.md)."""
ROW_FIXED_S = 60.0
"""Per row besides training: process start, the test split, ONNX export, latency, the deployed file's top-1."""


def estimate_s(row: str, budget: Budget, done_epochs: int = 0) -> float:
    """Estimated wall seconds of ``row`` at ``budget`` on the 2-core CPU, two rows side by side; ``done_epochs``:
    epochs its partial state has already trained.

    Example:
        >>> from suite_rows import resolve_budget
        >>> cpu30, _ = resolve_budget("cpu30", {"model": "x", "flags": ["avx512_bf16"], "bf16": True})
        >>> round(estimate_s("dense", cpu30) / 60), round(estimate_s("teacher", cpu30) / 60)
        (36, 106)
        >>> round(estimate_s("dense", cpu30, done_epochs=15) / 60)
        19
    """
    epochs = budget.teacher_epochs if row == "teacher" else budget.epochs
    images = train_steps(budget, epochs - done_epochs) * budget.batch_size
    per_image = EPOCH_S / 45000 * (1.0 if budget.precision == "bf16-mixed" else FP32_SLOWDOWN)
    return ROW_FIXED_S + images * per_image * ROWS[row].cost


def queue_order(rows: Sequence[str]) -> list[str]:
    """``rows`` with the rows that others need moved to the front (the teacher before the KD rows)."""
    needed = {need for row in rows for need in ROWS[row].needs}
    return [row for row in rows if row in needed] + [row for row in rows if row not in needed]


def next_ready(queue: Sequence[str], ended: set[str]) -> str | None:
    """The first row of ``queue`` whose needs are all in ``ended`` (landed), or None."""
    return next((row for row in queue if all(need in ended for need in ROWS[row].needs)), None)


@dataclass(frozen=True)
class Slot:
    """When a row is expected to run, in seconds from the start of the queue."""

    row: str
    start_s: float
    end_s: float


def schedule(queue: Sequence[str], estimates: dict[str, float], jobs: int, landed: set[str] = frozenset()) -> list[Slot]:
    """Start and end of each queued row when ``jobs`` run at a time, as :func:`run_queue` starts them.

    Example:
        >>> [(s.row, s.start_s, s.end_s) for s in schedule(["teacher", "dense", "kd"],
        ...                                                {"teacher": 3, "dense": 1, "kd": 2}, jobs=2)]
        [('teacher', 0, 3), ('dense', 0, 1), ('kd', 3, 5)]
    """
    pending, ended, running, slots, now = list(queue), set(landed), [], [], 0
    while pending:
        while len(running) < jobs and (row := next_ready(pending, ended)) is not None:
            pending.remove(row)
            slots.append(Slot(row, now, now + estimates[row]))
            running.append((now + estimates[row], row))
        if not running:
            raise ValueError(f"rows {pending} need rows that are neither queued nor landed")
        running.sort()
        now, row = running.pop(0)
        ended.add(row)
    return slots


def _clock(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}:{minutes % 60:02d}"


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``1 h 46 min``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def say(message: str) -> None:
    print(f"[suite] {time.strftime('%H:%M:%S')} {message}", flush=True)


def plan_lines(budget: Budget, queue: Sequence[str], landed: Sequence[str], jobs: int, threads: int,
               resumed: Mapping[str, int] | None = None) -> list[str]:
    """The plan printed at the start: queue order, each row's estimate (``resumed``: epochs done by rows resuming
    from their partial state, not counted), start and end, and the finish."""
    resumed = resumed or {}
    estimates = {row: estimate_s(row, budget, resumed.get(row, 0)) for row in queue}
    slots = schedule(queue, estimates, jobs, set(landed))
    lines = [(f"plan: budget {budget.name} ({budget.epochs} epochs, teacher {budget.teacher_epochs}, batch "
              f"{budget.batch_size}, {budget.precision}), {jobs} row{'s' if jobs > 1 else ''} at a time, "
              f"{threads} torch thread{'s' if threads > 1 else ''} each"),
             f"landed, kept: {', '.join(landed) or 'none'}"]
    if not slots:
        return [*lines, "nothing to run"]
    width = max(len("row"), *(len(slot.row) for slot in slots))
    lines.append(f"{'#':>3}  {'row':<{width}} {'needs':<8} {'estimate':>8} {'start':>7} {'end':>7}   (h:mm from now)")
    for i, slot in enumerate(slots, 1):
        done = f"   resumes after epoch {resumed[slot.row]}" if slot.row in resumed else ""
        lines.append(f"{i:>3}  {slot.row:<{width}} {','.join(ROWS[slot.row].needs) or '-':<8} "
                     f"{_clock(estimates[slot.row]):>8} {'+' + _clock(slot.start_s):>7} {'+' + _clock(slot.end_s):>7}{done}")
    finish = max(slot.end_s for slot in slots)
    lines.append(f"estimated finish: +{_clock(finish)} h:mm, about "
                 f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(time.time() + finish))} (assumes ~{EPOCH_S:.0f} s "
                 f"per ResNet-20 epoch per process with two side by side{'' if budget.precision == 'bf16-mixed' else f', x{FP32_SLOWDOWN} for fp32'}, "
                 f"the other rows scaled by their cost, {ROW_FIXED_S:.0f} s per row to test and measure; "
                 "nothing else heavy on the machine)")
    return lines


def _stop(running: dict[str, tuple[subprocess.Popen, float, Path]]) -> None:
    """Stop the queue's own row processes (SIGTERM, then SIGKILL after 15 s); their rows record nothing."""
    for process, _, _ in running.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 15
    for process, _, _ in running.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ended_line(row: str, returncode: int, record: dict[str, Any] | None, wall_s: float, estimate: float,
                code_now: str) -> str:
    if record is None:
        what = f"failed: exit {returncode}, nothing recorded"
    elif record["status"] == "ok":
        what = f"ok, top-1 {record['top1']:.2f} %"
    else:
        what = f"{record['status']}: {record.get('reason', '')}"
    line = f"end {row}: {what}, wall {duration(wall_s)} (estimate {duration(estimate)})"
    if record is not None and record["code_version"] != code_now:
        line += (f"; its package sources changed while it ran (recorded for code {record['code_version']}, now "
                 f"{code_now}): the table marks it older code and a later run measures it again")
    return line


def _new_record(suite: Suite, row: str, since: int) -> dict[str, Any] | None:
    """The record ``row``'s process appended after line ``since``, whatever the code version is now (others
    may edit the package while a row trains)."""
    return next((r for r in reversed(suite.recorded()[since:]) if r["row"] == row and r["config"] == suite.config(row)),
                None)


def plan_queue(suite: Suite, rows: Sequence[str]) -> tuple[list[str], list[str]]:
    """The rows asked for and the rows they need, split into landed (kept) and queued (in queue order)."""
    asked = list(dict.fromkeys([*(need for row in rows for need in ROWS[row].needs), *rows]))
    # --force re-measures the rows asked for; a row only needed (the teacher) is reused when it landed
    landed = [row for row in asked if not (suite.force and row in rows) and suite.landed(row)]
    return landed, queue_order([row for row in asked if row not in landed])


def run_queue(suite: Suite, rows: Sequence[str], jobs: int, threads: int, command: Callable[[str], list[str]],
              log_dir: Path, again: str) -> int:
    """Run ``rows`` (and the rows they need) ``jobs`` at a time, each as ``command(row)`` in its own process.

    Args:
        suite: Says which rows have landed (``landed``), what they recorded (``recorded``, ``config``), and
            whether the rows asked for are re-measured even if they landed (``force``).
        rows: Rows asked for; rows they need that have not landed are queued first.
        jobs: Rows side by side.
        threads: Torch threads of each row's process (for the plan line).
        command: A row's command line.
        log_dir: Where each row's output goes (``<budget>_<row>.log``).
        again: The command that finishes the queue, printed when it stops early or rows failed.

    Returns:
        0 when every row landed, 1 when one failed or could not start, 130 when stopped.
    """
    landed, queue = plan_queue(suite, rows)
    asked = [*landed, *queue]
    resumed = suite.resumed_epochs(queue)
    for line in plan_lines(suite.budget, queue, landed, jobs, threads, resumed):
        say(line)
    log_dir.mkdir(parents=True, exist_ok=True)
    ended, failed = set(landed), []
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    lines_before: dict[str, int] = {}  # the results file's length when a row started: its record comes after
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while queue or running:
            while len(running) < jobs and (row := next_ready(queue, ended)) is not None:
                queue.remove(row)
                lines_before[row] = len(suite.recorded())
                log = log_dir / f"{suite.budget.name}_{row}.log"
                with open(log, "w") as out:  # the child keeps its own descriptor
                    process = subprocess.Popen(command(row), stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True)  # a terminal's Ctrl-C reaches the queue only
                running[row] = (process, time.monotonic(), log)
                say(f"start {row} (estimate {duration(estimate_s(row, suite.budget, resumed.get(row, 0)))}; running: "
                    f"{', '.join(running)}; log {log})")
            for row in [row for row in queue if any(need in failed for need in ROWS[row].needs)]:
                queue.remove(row)
                failed.append(row)
                say(f"not started {row}: it needs {', '.join(ROWS[row].needs)}, which did not land")
            time.sleep(0.5)
            for row, (process, started, log) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[row]
                record = _new_record(suite, row, lines_before[row])
                ok = process.returncode == 0 and record is not None and record["status"] != "failed"
                if ok:
                    ended.add(row)
                else:
                    failed.append(row)
                say(_ended_line(row, process.returncode, record, time.monotonic() - started,
                                estimate_s(row, suite.budget, resumed.get(row, 0)), code_version(ROWS[row].sources))
                    + ("" if ok else f" (log {log})"))
    except KeyboardInterrupt:
        say(f"stopping {', '.join(running) or 'the queue'}")
        _stop(running)  # a row past its training when stopped may still land (its test and measures finish)
        for row in running:
            landed_now = _new_record(suite, row, lines_before[row]) is not None
            say(f"stopped {row}: " + ("it landed while stopping" if landed_now else "nothing recorded"))
        say(f"stopped; finish with: {again}")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        say(f"done; not landed: {', '.join(failed)}. Retry with: {again}")
        return 1
    say(f"done; every row landed ({', '.join(row for row in asked)})")
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def child_command(args: Any, row: str, threads: int, jobs: int) -> list[str]:
    """``suite.py`` for one row with the queue's budget, data and folders (what ``args`` were given)."""
    command = [sys.executable, str(Path(__file__).with_name("suite.py")), "--budget", args.budget, "--only", row,
               "--threads", str(threads), "--data", str(args.data), "--results-dir", str(args.results_dir),
               "--work-dir", str(args.work_dir), "--side-by-side", str(jobs)]
    if args.partials:
        command += ["--partials", str(args.partials)]
    if args.epochs:
        command += ["--epochs", str(args.epochs)]
    if args.force:
        command.append("--force")
    if args.data_on_device:
        command.append("--data-on-device")
    if args.accelerator:
        command += ["--accelerator", args.accelerator]
    return command
