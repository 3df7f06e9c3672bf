"""Factorized blocks: the same function as the dense layer at full rank, MACs as count_macs counts them."""

import pytest
import torch
from torch import nn

from lightning_compress.core.accounting import count_macs, count_parameters
from lightning_compress.factorization.blocks import (
    KXK_METHODS,
    Geometry,
    block_macs,
    factorize_layer,
    factorized_structure,
    is_factorizable,
    layer_geometries,
    layer_method,
    max_rank,
)

CONVS = [
    nn.Conv2d(8, 16, 3, stride=2, padding=1),
    nn.Conv2d(8, 8, 3, padding=1, bias=False),
    nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    nn.Conv2d(8, 8, 3, padding="same"),
    nn.Conv2d(4, 6, 3, padding=2, padding_mode="reflect"),
]


def _cases():
    for conv in CONVS:
        for method in KXK_METHODS:
            yield conv, method
    yield nn.Conv2d(8, 12, 1, stride=2, padding=1), "svd"
    yield nn.Linear(10, 7), "svd"


def _input(layer):
    return torch.randn(3, 10) if isinstance(layer, nn.Linear) else torch.randn(3, layer.in_channels, 11, 12)


def _geometry(layer, x, y):
    return Geometry((1, 1), (1, 1)) if isinstance(layer, nn.Linear) else Geometry(x.shape[2:], y.shape[2:])


@pytest.mark.parametrize("layer, method", list(_cases()), ids=lambda v: v if isinstance(v, str) else str(v))
def test_full_rank_block_computes_the_dense_layer_and_macs_match_the_counter(layer, method):
    torch.manual_seed(0)
    x = _input(layer)
    y = layer(x)
    assert layer_method(layer, method if method != "svd" else "tucker2") == method
    full = max_rank(layer, method)
    block = factorize_layer(layer, method, full)
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in block)
    torch.testing.assert_close(block(x), y, atol=2e-5, rtol=1e-4)
    geometry = _geometry(layer, x, y)
    assert block_macs(layer, None, None, geometry) == count_macs(layer, x[:1])
    for rank in sorted({1, full // 2 or 1, full}):
        assert block_macs(layer, method, rank, geometry) == count_macs(factorized_structure(layer, method, rank), x[:1])


def test_parameters_and_macs_of_a_tucker2_block():
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    block = factorize_layer(conv, "tucker2", 8)
    # 1x1 16->8, 3x3 8->8, 1x1 8->32
    assert count_parameters(block) == 16 * 8 + 8 * 8 * 9 + 8 * 32
    assert block_macs(conv, "tucker2", 8, Geometry((8, 8), (8, 8))) == (16 * 8 + 8 * 8 * 9 + 8 * 32) * 64
    assert count_parameters(factorize_layer(nn.Linear(10, 6), "svd", 3)) == 10 * 3 + 3 * 6 + 6


def test_block_keeps_dtype_mode_grad_flag_and_channels_last():
    conv = nn.Conv2d(8, 8, 3, padding=1).double().eval().to(memory_format=torch.channels_last)
    conv.weight.requires_grad_(False)
    block = factorize_layer(conv, "spatial", 4)
    assert {p.dtype for p in block.parameters()} == {torch.float64}
    assert not block.training and not block[0].weight.requires_grad
    assert block[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_refuses_what_it_cannot_factorize():
    assert not is_factorizable(nn.Conv2d(4, 4, 3, groups=2)) and not is_factorizable(nn.Conv1d(4, 4, 3))
    with pytest.raises(ValueError, match="only Linear and ungrouped Conv2d"):
        factorized_structure(nn.Conv2d(4, 4, 3, groups=4), "tucker2", 2)
    with pytest.raises(ValueError, match="method 'svd' does not fit"):
        factorized_structure(nn.Conv2d(4, 4, 3), "svd", 2)
    with pytest.raises(ValueError, match="method 'spatial' does not fit"):
        factorized_structure(nn.Linear(4, 4), "spatial", 2)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 9\]"):
        factorized_structure(nn.Conv2d(4, 16, 3), "depthwise_separable", 10)


def test_geometries_come_from_one_forward_and_shared_layers_are_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(64, 2))
    geometries = layer_geometries(net, ["0", "2"], (torch.randn(1, 3, 8, 8),))
    assert geometries == {"0": Geometry((8, 8), (4, 4)), "2": Geometry((1, 1), (1, 1))}

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    with pytest.raises(ValueError, match=r"called once per forward pass can be factorized; calls: \{'conv': 2\}"):
        layer_geometries(Twice(), ["conv"], (torch.randn(1, 3, 4, 4),))
