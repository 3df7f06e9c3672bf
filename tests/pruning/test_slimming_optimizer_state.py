"""Optimizer state follows channel removal for every dtype and size (no silent reset)."""

import pytest
import torch
from torch import nn

from lightning_compress.pruning.slimming import remove_channels, trace_dependencies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_momentum_is_sliced_not_dropped_for_every_dtype(dtype):
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).to(dtype)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for param in net.parameters():  # distinct, recognisable momentum per element
        sgd.state[param]["momentum_buffer"] = torch.arange(param.numel(), dtype=dtype).view_as(param)
    weight_before = net[0].weight.detach().clone()
    remove_channels(trace_dependencies(net, torch.randn(1, 3, dtype=dtype)), {"0": [1, 4]}, [sgd])
    kept_rows = [0, 2, 3, 5]
    assert net[0].weight.dtype == dtype and net[0].weight.shape == (4, 3)
    assert torch.equal(net[0].weight.detach(), weight_before[kept_rows])
    momentum = sgd.state[net[0].weight]["momentum_buffer"]
    expected = torch.arange(18, dtype=dtype).view(6, 3)[kept_rows]
    assert torch.equal(momentum, expected)
    assert torch.equal(sgd.state[net[2].weight]["momentum_buffer"],
                       torch.arange(12, dtype=dtype).view(2, 6)[:, kept_rows])


def test_momentum_of_a_tensor_larger_than_float32_indices_is_kept():
    """More than 2**24 elements: flat indices no longer fit float32; the state must still follow."""
    net = nn.Sequential(nn.Linear(4097, 4100), nn.Linear(4100, 2))
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    buffer = torch.randn_like(net[0].weight)
    sgd.state[net[0].weight]["momentum_buffer"] = buffer
    remove_channels(trace_dependencies(net, torch.randn(1, 4097)), {"0": [0]}, [sgd])
    assert torch.equal(sgd.state[net[0].weight]["momentum_buffer"], buffer[1:])
