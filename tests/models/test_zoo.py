"""The model zoo: registry behaviour, shapes, parameter counts, traceability, prunability."""

from __future__ import annotations

import math

import pytest
import torch
import torch_pruning as tp
from torch import fx, nn

from lightning_compress.core.layers import select_layers
from lightning_compress.models import create_model, list_models, register_model
from lightning_compress.models.resnet_cifar import cifar_resnet

# Parameter counts for 10 classes: He et al. 2016 (CIFAR ResNets), torchvision (MobileNetV2 with a
# 10-class head), chenyaofo/pytorch-cifar-models (VGG-BN), the common CIFAR ResNet-18.
REFERENCE_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet18": 11.17e6,
    "mobilenetv2": 2.24e6,
    "vgg11_bn": 9.76e6,
    "vgg16_bn": 15.25e6,
}

# (stem conv, classifier) module names, the two layers the shared selection rule leaves out.
STEM_AND_CLASSIFIER = {
    "mobilenetv2": ("features.0.0", "classifier.1"),
    "vgg11_bn": ("features.0", "classifier.6"),
    "vgg16_bn": ("features.0", "classifier.6"),
}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_is_sorted_and_complete():
    assert list_models() == sorted(REFERENCE_PARAMS)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_param_count_within_two_percent_of_reference(name):
    count = num_params(create_model(name, num_classes=10))
    assert abs(count / REFERENCE_PARAMS[name] - 1) < 0.02, f"{name}: {count:,} params"


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_with_num_classes(name):
    model = create_model(name, num_classes=100)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    logits.logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("name", list_models())
def test_symbolic_trace_matches_eager(name):
    model = create_model(name).eval()
    traced = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))
    assert any(node.op == "call_module" for node in traced.graph.nodes)


@pytest.mark.parametrize("name", list_models())
def test_stem_is_first_conv_and_classifier_last_linear(name):
    model = create_model(name, num_classes=7)
    stem, classifier = STEM_AND_CLASSIFIER.get(name, ("conv1", "fc"))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert convs[0] == stem and model.get_submodule(stem).in_channels == 3
    assert linears[-1] == classifier and model.get_submodule(classifier).out_features == 7
    selected = select_layers(model)
    assert stem not in selected and classifier not in selected
    assert len(selected) == len(convs) + len(linears) - 2


@pytest.mark.parametrize("name", list_models())
def test_activations_are_modules_fusable_with_conv_bn(name):
    """FX Conv-BN-ReLU fusion matches module calls: every activation must be a ReLU/ReLU6 module."""
    model = create_model(name)
    graph = fx.symbolic_trace(model).graph
    assert not [
        n for n in graph.nodes if n.op in ("call_function", "call_method") and "relu" in str(n.target)
    ]

    def module_type(node: fx.Node) -> type | None:
        return type(model.get_submodule(node.target)) if node.op == "call_module" else None

    fusable = [
        n
        for n in graph.nodes
        if module_type(n) in (nn.ReLU, nn.ReLU6)
        and module_type(bn := n.args[0]) is nn.BatchNorm2d
        and module_type(bn.args[0]) is nn.Conv2d
    ]
    activations = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    # ResNet blocks end in add-then-ReLU, VGG's classifier has Linear-ReLU; all others are fusable.
    if name.startswith("resnet"):
        assert len(fusable) == len(activations) - sum(
            1 for n, _ in model.named_modules() if n.endswith("relu2")
        )
    elif name.startswith("vgg"):
        assert len(fusable) == len(activations) - 2
    else:
        assert len(fusable) == len(activations)


def test_resnet_uses_projection_shortcuts_where_shape_changes():
    model = create_model("resnet20")
    downsamples = [n for n, m in model.named_modules() if n.endswith("downsample")]
    assert downsamples == ["layer2.0.downsample", "layer3.0.downsample"]
    assert isinstance(model.layer2[0].downsample[0], nn.Conv2d)
    assert model.layer2[0].downsample[0].kernel_size == (1, 1)


def test_resnet20_channel_pruning_with_dependency_graph():
    model = create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = tp.pruner.MagnitudePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[model.fc],
    )
    pruner.step()
    assert model(x).shape == (2, 10)
    assert num_params(model) < 0.3 * 272_474
    # The shortcut projection and the block's conv2 were pruned together.
    assert model.layer2[0].downsample[0].out_channels == model.layer2[0].conv2.out_channels < 32


def test_width_mult_scales_mobilenetv2():
    counts = [num_params(create_model("mobilenetv2", width_mult=w)) for w in (0.5, 1.0, 1.4)]
    assert counts[0] < counts[1] < counts[2]
    assert create_model("mobilenetv2", width_mult=0.5).features[0][0].out_channels == 16


def test_convolutions_use_kaiming_normal_fan_out():
    model = create_model("resnet56")
    weight = model.layer3[4].conv1.weight  # 64 output channels, 3x3
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)


def test_same_seed_gives_same_weights():
    torch.manual_seed(3)
    first = create_model("resnet20").state_dict()
    torch.manual_seed(3)
    second = create_model("resnet20").state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_module_passes_through_unchanged():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    assert create_model(net) is net
    assert create_model(net, num_classes=100) is net
    with pytest.raises(ValueError, match=r"width_mult.*only apply to a model given by name"):
        create_model(net, width_mult=0.5)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'resnet_20'") as info:
        create_model("resnet_20")
    assert all(name in str(info.value) for name in list_models())
    assert "Did you mean 'resnet20'" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width_mult": 0.5}, r"model 'resnet20' got unexpected arguments \['width_mult'\]"),
        ({"num_classes": 0}, "num_classes must be a positive integer, got 0"),
        ({"num_classes": 2.0}, "num_classes must be a positive integer"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("resnet20", **kwargs)


def test_bad_family_arguments_raise():
    with pytest.raises(ValueError, match="accepts: width_mult, dropout"):
        create_model("mobilenetv2", depth=3)
    with pytest.raises(ValueError, match="width_mult must be a positive number, got -1"):
        create_model("mobilenetv2", width_mult=-1)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        create_model("vgg16_bn", dropout=1.5)
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        cifar_resnet(21)
    with pytest.raises(ValueError, match="name_or_module must be a model name or an nn.Module, got int"):
        create_model(3)


def test_register_model_rejects_duplicates_and_factories_without_num_classes():
    with pytest.raises(ValueError, match="'resnet20' is already registered"):
        register_model("resnet20")(lambda num_classes=10: nn.Identity())
    with pytest.raises(ValueError, match="must accept a `num_classes` argument"):
        register_model("no_num_classes")(lambda: nn.Identity())
    assert "no_num_classes" not in list_models()
