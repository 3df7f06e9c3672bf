"""Layer selection by type and glob pattern, and finding the network inside a LightningModule."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_compress.core.layers import find_network, resolve_parameters, select_layers
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
