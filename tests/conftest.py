"""Test-wide settings: small thread pools (CI has 2 cores), deterministic seeds, and each test holding the
machine's timing lock shared (a benchmark timing on the same machine measures between tests, not beside them).

The run has two pytest-xdist workers (pyproject addopts), each with its own private lock: a test's measurements
run beside the other worker's test, as on any busy machine (tests check relations between readings taken in
turns, not figures)."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

from lightning_compress.core.timing_lock import LOCK_ENVIRONMENT, shared_timing


def _private_lock() -> Path:
    return Path(tempfile.gettempdir()) / f"lightning_compress-tests-{os.getpid()}.lock"


def pytest_sessionfinish(session, exitstatus):
    _private_lock().unlink(missing_ok=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # the machine's lock held shared, taken before the test's fixtures run; inside the test (and the processes it
    # starts: benchmark scripts time with the lock) measurements use a lock of this session's own, which the
    # shared hold does not block
    private = str(_private_lock())
    before = os.environ.get(LOCK_ENVIRONMENT)
    with shared_timing():
        os.environ[LOCK_ENVIRONMENT] = private
        try:
            return (yield)
        finally:
            if before is None:
                os.environ.pop(LOCK_ENVIRONMENT, None)
            else:
                os.environ[LOCK_ENVIRONMENT] = before


@pytest.fixture(autouse=True)
def _deterministic_small_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    # Trainer(deterministic=True) switches torch's deterministic algorithms on for the whole process and never
    # back: a later test's int8 kernels (quantized_resize_cpu_) would refuse to run
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
