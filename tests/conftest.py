"""Test-wide settings: small thread pools (CI has 2 cores) and deterministic seeds."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_small_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    # Trainer(deterministic=True) switches torch's deterministic algorithms on for the whole process and never
    # back: a later test's int8 kernels (quantized_resize_cpu_) would refuse to run
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
