"""Layer selection by type and glob pattern, and finding the network inside a LightningModule."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_compress.core.layers import (
    find_network,
    resolve_parameters,
    select_layers,
    select_weights,
    weight_label,
    weight_parameters,
)
from lightning_compress.models import create_model
from tests.toy import ToyConvNet, UserClassifier


def test_default_rule_skips_stem_and_classifier():
    assert select_layers(ToyConvNet()) == ["conv1", "conv2"]
    names = select_layers(UserClassifier())
    assert names == ["net.conv1", "net.conv2"]


def test_default_rule_on_zoo_resnet20():
    names = select_layers(create_model("resnet20"))
    assert "conv1" not in names and "fc" not in names
    assert len(names) == 18 + 2  # 9 blocks x 2 convs + 2 projection shortcuts


def test_include_and_exclude_patterns():
    net = ToyConvNet()
    assert select_layers(net, include="*") == ["stem", "conv1", "conv2", "fc"]
    assert select_layers(net, include=["conv*", "fc"], exclude="conv2") == ["conv1", "fc"]


def test_pattern_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match=r"exclude pattern 'layer9\*' matches no layer; candidate layers are: "
                                         r"\['stem', 'conv1', 'conv2', 'fc'\]"):
        select_layers(ToyConvNet(), exclude="layer9*")


def test_caller_argument_names_appear_in_errors():
    with pytest.raises(ValueError, match="ignore pattern 'x' matches no layer"):
        select_layers(ToyConvNet(), exclude="x", argument_names=("layers", "ignore"))


def test_selecting_nothing_is_an_error():
    with pytest.raises(ValueError, match="no layer selected"):
        select_layers(ToyConvNet(), include="fc", exclude="fc")


def test_resolve_parameters_follows_module_replacement():
    net = ToyConvNet()
    before = resolve_parameters(net, ["conv1.weight"])["conv1.weight"]
    net.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
    after = resolve_parameters(net, ["conv1.weight"])["conv1.weight"]
    assert after is net.conv1.weight and after is not before
    with pytest.raises(KeyError, match="conv9.weight"):
        resolve_parameters(net, ["conv9.weight"])


def test_find_network():
    assert find_network(UserClassifier())[0] == "net"
    assert find_network(UserClassifier(), "net")[1] is not None
    with pytest.raises(ValueError, match="network attribute 'model' is not a submodule; submodules are: \\['net'\\]"):
        find_network(UserClassifier(), "model")
    two = nn.Module()
    two.a, two.b = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"cannot tell which submodule is the network: .*\['a', 'b'\]"):
        find_network(two)


class _Attention(nn.Module):
    """A stem conv, one self-attention (shared q/k/v size), one cross-attention (own k/v sizes), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.attn = nn.MultiheadAttention(8, 2)
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
        self.head = nn.Linear(8, 2)


def test_attention_projections_are_weights_selected_by_default():
    names = select_weights(_Attention())
    assert names == ["attn.in_proj_weight", "attn.out_proj.weight", "cross.q_proj_weight", "cross.k_proj_weight",
                     "cross.v_proj_weight", "cross.out_proj.weight"]  # not stem.weight, not head.weight
    assert [weight_label(name) for name in names][:2] == ["attn.in_proj_weight", "attn.out_proj"]
    assert select_layers(_Attention()) == ["attn.out_proj", "cross.out_proj"]  # layers only: no projections


def test_weight_patterns_match_labels():
    assert select_weights(_Attention(), include="*_proj_weight", exclude="cross.*") == ["attn.in_proj_weight"]
    assert select_weights(_Attention(), include=["stem", "head"]) == ["stem.weight", "head.weight"]
    with pytest.raises(ValueError, match=r"exclude pattern 'attn' matches no layer; candidate layers are: "
                                         r"\['stem', 'attn.in_proj_weight', 'attn.out_proj', "):
        select_weights(_Attention(), exclude="attn")


def test_weight_parameters_follow_registration_order_and_skip_absent_matrices():
    net = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1))
    assert weight_parameters(net) == ["0.weight", "1.in_proj_weight", "1.out_proj.weight"]
    assert net[1].q_proj_weight is None  # registered as None when q/k/v share a size: not a candidate
