"""Test-wide settings: small thread pools (CI has 2 cores) and deterministic seeds."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_small_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
