"""The machine-wide timing lock: re-entrant within a process, exclusive across processes (real flock, real
subprocesses)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lightning_compress.core import timing_lock
from lightning_compress.core.timing_lock import LOCK_ENVIRONMENT, exclusive_timing, held_mode, shared_timing

pytestmark = pytest.mark.skipif(timing_lock.fcntl is None, reason="no advisory file locks on this platform")

MODULE = Path(timing_lock.__file__)
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("timing_lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
with getattr(lock, sys.argv[2] + "_timing")():
    open(sys.argv[3], "w").close()
    time.sleep(float(sys.argv[4]))
"""


@pytest.fixture
def lock_file(tmp_path, monkeypatch):
    path = tmp_path / "timing.lock"
    monkeypatch.setenv(LOCK_ENVIRONMENT, str(path))
    return path


def hold_in_another_process(mode: str, seconds: float, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / f"{mode}.ready"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(MODULE), mode, str(ready), str(seconds)])
    while not ready.exists():
        assert process.poll() is None, "the holder exited before taking the lock"
        time.sleep(0.01)
    return process


def test_nested_holds_take_the_strongest_mode_and_give_back_the_outer_one(lock_file):
    assert held_mode() is None
    with shared_timing():
        assert held_mode() == "shared"
        with exclusive_timing():
            with exclusive_timing():  # re-entrant: a measurement inside a measurement
                assert held_mode() == "exclusive"
            assert held_mode() == "exclusive"
        assert held_mode() == "shared"
    assert held_mode() is None and lock_file.exists()


def test_a_measurement_waits_for_another_process_measuring(lock_file, tmp_path):
    holder = hold_in_another_process("exclusive", 1.0, tmp_path)
    begin = time.perf_counter()
    with exclusive_timing():
        waited = time.perf_counter() - begin
    holder.wait()
    assert waited > 0.5


def test_shared_holders_do_not_wait_for_each_other_but_a_measurement_waits_for_them(lock_file, tmp_path):
    holder = hold_in_another_process("shared", 1.0, tmp_path)
    begin = time.perf_counter()
    with shared_timing():
        assert time.perf_counter() - begin < 0.5
    begin = time.perf_counter()
    with exclusive_timing():
        waited = time.perf_counter() - begin
    holder.wait()
    assert waited > 0.5


TAKING_TURNS = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("timing_lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
open(sys.argv[2], "w").close()
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:  # a training row: steps holding the lock shared, a moment free between them
    with lock.shared_timing():
        time.sleep(0.2)
"""


def test_a_measurement_is_not_starved_by_shared_holders_taking_turns(lock_file, tmp_path):
    """Two processes whose shared holds overlap (one starts its step while the other's runs) never leave the lock
    free together; a measurement still gets it within about one step."""
    rows = []
    for index, offset in enumerate((0.0, 0.1)):
        ready = tmp_path / f"row{index}.ready"
        rows.append(subprocess.Popen([sys.executable, "-c", TAKING_TURNS, str(MODULE), str(ready), "6"]))
        while not ready.exists():
            time.sleep(0.01)
        time.sleep(offset)
    time.sleep(0.5)
    begin = time.perf_counter()
    with exclusive_timing():
        waited = time.perf_counter() - begin
        time.sleep(0.3)  # measuring: neither row steps
    for row in rows:
        row.kill()
    assert waited < 1.0


MEASURING_INSIDE_A_STEP = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("timing_lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
with lock.shared_timing():  # a training row's step that measures (CompressToTarget planning)
    with lock.exclusive_timing():
        open(sys.argv[2], "w").close()
        time.sleep(1.0)
    time.sleep(0.5)  # back to its shared hold, then done
"""


def test_a_measurement_waiting_while_another_process_measures_inside_its_step_gets_the_lock(lock_file, tmp_path):
    """Two rows planning at once: one measures inside its training step (shared, then exclusive) while the other
    waits to measure. Giving the exclusive hold back to the shared one must not wait at the turnstile the waiting
    measurement holds (it did, holding the lock exclusively: both rows stopped for good)."""
    ready = tmp_path / "measuring.ready"
    row = subprocess.Popen([sys.executable, "-c", MEASURING_INSIDE_A_STEP, str(MODULE), str(ready)])
    while not ready.exists():
        assert row.poll() is None, "the row exited before measuring"
        time.sleep(0.01)
    got = threading.Event()

    def measure() -> None:
        with exclusive_timing():
            got.set()

    waiter = threading.Thread(target=measure, daemon=True)
    waiter.start()
    try:
        assert got.wait(timeout=10), "deadlock: the waiting measurement never got the lock"
        assert row.wait(timeout=10) == 0
    finally:
        row.kill()  # frees a deadlocked waiter
        waiter.join(timeout=5)
