"""The machine-wide timing lock: re-entrant within a process, exclusive across processes (real flock, real
subprocesses)."""

from __future__ import annotations

import subprocess
import sys
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
