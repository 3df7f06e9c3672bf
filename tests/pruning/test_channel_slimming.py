"""The torch-pruning seam and the importance criteria, on tiny networks."""

import pytest
import torch
from torch import nn

from lightning_compress.models import create_model
from lightning_compress.pruning.importance import resolve_importance
from lightning_compress.pruning.slimming import (
    check_prunable,
    group_channels,
    prunable_groups,
    remove_channels,
    replay_history,
    trace_dependencies,
)
from tests.toy import ToyConvNet


def _trained_step(net, optimizer, x):
    optimizer.zero_grad()
    net(x).square().mean().backward()
    optimizer.step()


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01),
])
def test_remove_channels_slices_optimizer_state_to_the_kept_channels(make_optimizer):
    net = ToyConvNet(width=4)
    optimizer = make_optimizer(net.parameters())
    x = torch.randn(2, 3, 8, 8)
    _trained_step(net, optimizer, x)
    old_weight, old_state = net.conv1.weight, {k: v.clone() for k, v in optimizer.state[net.conv1.weight].items()}
    old_bn_state = {k: v.clone() for k, v in optimizer.state[net.bn1.weight].items()}
    old_next_state = {k: v.clone() for k, v in optimizer.state[net.conv2.weight].items()}
    graph = trace_dependencies(net, x[:1])
    remove_channels(graph, {"conv1": [1, 5]}, [optimizer])
    kept = [0, 2, 3, 4, 6, 7]
    assert net.conv1.out_channels == net.bn1.num_features == net.conv2.in_channels == 6
    assert net.conv1.weight is not old_weight
    for key, value in old_state.items():
        if value.ndim:  # per-element state is sliced along the removed output channels
            assert torch.equal(optimizer.state[net.conv1.weight][key], value[kept])
            assert torch.equal(optimizer.state[net.bn1.weight][key], old_bn_state[key][kept])
            assert torch.equal(optimizer.state[net.conv2.weight][key], old_next_state[key][:, kept])
        else:  # Adam's step count is kept
            assert torch.equal(optimizer.state[net.conv1.weight][key], value)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert [p.shape for p in params] == [p.shape for p in net.parameters()]
    assert all(a is b for a, b in zip(params, net.parameters()))
    _trained_step(net, optimizer, x)  # and it keeps training


def test_residual_adds_and_depthwise_convs_are_pruned_together():
    for name in ("resnet20", "mobilenetv2"):
        net = create_model(name, num_classes=10)
        x = torch.randn(1, 3, 32, 32)
        graph = trace_dependencies(net, x)
        groups = prunable_groups(graph, [net.get_submodule(n) for n, m in net.named_modules() if isinstance(m, nn.Linear)])
        plan = {root: [0] for root, group in groups.items() if group_channels(group) > 1}
        remove_channels(graph, plan)
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        for module in net.modules():
            if isinstance(module, nn.Conv2d) and module.groups > 1:  # depthwise stays depthwise
                assert module.groups == module.in_channels == module.out_channels


def test_replay_history_rebuilds_the_slimmed_architecture():
    net = ToyConvNet(width=4)
    graph = trace_dependencies(net, torch.randn(1, 3, 8, 8))
    remove_channels(graph, {"conv1": [0, 1, 2], "stem": [3]})
    fresh = ToyConvNet(width=4)
    replay_history(fresh, torch.randn(1, 3, 8, 8), graph.pruning_history())
    fresh.load_state_dict(net.state_dict())  # strict: every shape matches
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(fresh.eval()(x), net.eval()(x))


class _HardCodedReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.head(self.conv(x).reshape(x.shape[0], 4 * 8 * 8))


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.inner = nn.Sequential(nn.Identity(), _Raises())

    def forward(self, x):
        return self.inner(self.conv(x))


class _Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("unsupported op")


def test_untraceable_or_unslimmable_networks_raise_naming_the_module():
    with pytest.raises(ValueError, match=r"unsupported op \(in module 'inner.1' of type _Raises\)"):
        trace_dependencies(_Broken(), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"removing a channel of 'conv' \(Conv2d\)"):
        check_prunable(_HardCodedReshape(), torch.randn(1, 3, 8, 8), ["head"])
    with pytest.raises(ValueError, match="no channel of the network can be removed"):
        check_prunable(nn.Sequential(nn.Linear(3, 2)), torch.randn(1, 3), ["0"])


def test_importance_criteria_rank_channels_as_their_definitions_say():
    net = ToyConvNet(width=4)
    with torch.no_grad():
        net.conv1.weight.copy_(torch.arange(8.0).view(8, 1, 1, 1).expand_as(net.conv1.weight))
        net.conv2.weight.fill_(0.01)
        net.bn1.weight.copy_(torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1]))
    graph = trace_dependencies(net, torch.randn(1, 3, 8, 8))
    group = prunable_groups(graph, [net.fc])["conv1"]
    assert resolve_importance("l1")(group).argmin().item() == 0
    assert resolve_importance("l2")(group).argmin().item() == 0
    assert resolve_importance("bn_scale")(group).argmin().item() == 7
    with pytest.raises(RuntimeError, match="taylor.*needs gradients"):
        resolve_importance("taylor")(group)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert resolve_importance("taylor")(group).shape == (8,)
    with pytest.raises(ValueError, match="importance must be one of"):
        resolve_importance("l3")
