"""Accounting: exact counts on modules small enough to compute by hand."""

import io

import pytest
import torch
from torch import nn

from lightning_compress.core.accounting import (
    Count,
    count_macs,
    count_macs_per_module,
    count_nonzero,
    count_parameters,
    measure_latency,
    serialized_size,
)
from tests.toy import ToyConvNet


def test_count_parameters_counts_shared_parameters_once_and_filters_trainable():
    shared = nn.Linear(3, 2)  # 6 weights + 2 biases
    net = nn.Sequential(shared, nn.ReLU(), nn.Linear(2, 2), shared)  # the Linear(2, 2) adds 6
    assert count_parameters(net) == 14
    net[2].weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 10


def test_count_nonzero_per_parameter_and_total():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]))
        layer.bias.copy_(torch.tensor([0.0, 5.0]))
    counts = count_nonzero(layer)
    assert counts.per_parameter == {"weight": Count(2, 6), "bias": Count(1, 2)}
    assert counts.total == Count(3, 8)
    assert counts.per_parameter["weight"].sparsity == pytest.approx(4 / 6)
    assert Count(0, 0).sparsity == 0.0


def test_conv_macs_are_cout_cin_k_k_hout_wout():
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, bias=False)
    x = torch.randn(1, 4, 9, 9)  # Hout = Wout = 5
    assert count_macs(conv, x) == 6 * 4 * 3 * 3 * 5 * 5
    assert count_macs(conv, torch.randn(3, 4, 9, 9)) == 3 * 6 * 4 * 3 * 3 * 5 * 5  # scales with batch


def test_depthwise_and_linear_macs():
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_macs(depthwise, torch.randn(1, 8, 4, 4)) == 8 * 1 * 3 * 3 * 4 * 4
    assert count_macs(nn.Linear(10, 7), torch.randn(2, 10)) == 2 * 10 * 7


def test_macs_per_module_names_match_named_modules_and_sum_to_total():
    net = ToyConvNet(num_classes=4, width=8)
    x = torch.randn(1, 3, 16, 16)
    per_module = count_macs_per_module(net, x)
    expected = {
        "stem": 8 * 3 * 9 * 16 * 16,
        "conv1": 16 * 8 * 9 * 8 * 8,
        "conv2": 16 * 16 * 9 * 8 * 8,
        "fc": 16 * 4,
    }
    assert {k: v for k, v in per_module.items() if k} == expected
    assert per_module[""] == sum(expected.values()) == count_macs(net, x)


def test_macs_leave_training_mode_and_batchnorm_statistics_untouched():
    net = ToyConvNet().train()
    net.conv1.eval()
    before = net.bn1.running_mean.clone()
    count_macs(net, torch.randn(2, 3, 16, 16) + 3.0)
    measure_latency(net, torch.randn(2, 3, 16, 16) + 3.0, repeats=1, warmup=0)
    assert net.training and net.bn1.training and not net.conv1.training
    assert torch.equal(net.bn1.running_mean, before)


def test_tuple_inputs_are_positional_arguments():
    class Add(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)

        def forward(self, a, b):
            return self.fc(a) + b

    assert count_macs(Add(), (torch.randn(1, 4), torch.randn(1, 4))) == 16


def test_serialized_size_is_torch_save_bytes_of_the_state_dict():
    layer = nn.Linear(32, 32)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    assert serialized_size(layer) == len(buffer.getvalue())
    assert serialized_size(layer.state_dict()) == len(buffer.getvalue())
    assert serialized_size(nn.Linear(64, 64)) - serialized_size(layer) >= (64 * 64 + 64 - 32 * 32 - 32) * 4


def test_measure_latency_is_positive_and_validates_arguments():
    assert measure_latency(nn.Linear(4, 4), torch.randn(1, 4), repeats=2, warmup=0) > 0
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(nn.Linear(4, 4), torch.randn(1, 4), repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        measure_latency(nn.Linear(4, 4), torch.randn(1, 4), warmup=-1)


def test_counting_macs_leaves_quantization_observers_untouched():
    from lightning_compress.quantization.prepare import prepare

    prepared = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "x86")
    prepared(torch.randn(2, 3, 8, 8))
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    count_macs(prepared, torch.randn(1, 3, 8, 8) * 100)
    assert all(torch.equal(before[k], v) for k, v in prepared.state_dict().items())
