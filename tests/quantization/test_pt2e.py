"""The PT2E family on torchao: prepare (QAT, static), train, switch modes, freeze, convert, on ToyConvNet."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e import disable_fake_quant

from lightning_compress.core.onnx import MissingExtraError
from lightning_compress.quantization import pt2e
from lightning_compress.quantization.check import check_conversion
from lightning_compress.quantization.engines import PT2E_ENGINES, KernelFamily, check_engine
from tests.toy import ToyConvNet, random_images

IMAGES, LABELS = random_images(256).tensors
_q = torch.ops.quantized_decomposed


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> list[float]:
    generator, losses = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        index = torch.randint(0, len(IMAGES), (16,), generator=generator)
        loss = nn.functional.cross_entropy(model(IMAGES[index]), LABELS[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _bn_running_means(model: nn.Module) -> list[torch.Tensor]:
    return [buffer.clone() for name, buffer in model.named_buffers() if name.endswith("running_mean")]


def _activation_scales(model: nn.Module) -> list[float]:
    return [float(m.scale) for m in model.modules() if isinstance(m, pt2e._ActivationFakeQuantize)]


@pytest.fixture(scope="module")
def trained():
    """ToyConvNet whose optimizer was built before preparation (batch 4), then 40 QAT steps on batches of 16."""
    torch.manual_seed(0)
    net = ToyConvNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    initial = net.stem.weight.detach().clone()
    prepared = pt2e.prepare(net, example_inputs=(IMAGES[:4],))
    losses = _train(prepared, optimizer, 40)
    return {"net": net, "prepared": prepared, "initial": initial, "losses": losses}


def test_qat_trains_the_parameters_an_optimizer_built_before_preparation_holds(trained):
    net, prepared = trained["net"], trained["prepared"]
    assert pt2e.is_pt2e_prepared(prepared) and not pt2e.is_pt2e_prepared(net)
    assert prepared.get_parameter("stem.weight") is net.stem.weight
    assert not torch.equal(net.stem.weight, trained["initial"])
    losses = trained["losses"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_the_graph_follows_train_and_eval_as_an_eager_network(trained):
    prepared = copy.deepcopy(trained["prepared"])
    eager = copy.deepcopy(trained["net"])
    prepared.apply(disable_fake_quant)
    images = IMAGES[:8]
    with torch.no_grad():
        prepared.eval()
        eager.eval()
        torch.testing.assert_close(prepared(images), eager(images), rtol=1e-4, atol=1e-4)  # running statistics
        means = _bn_running_means(prepared)
        prepared(images)
        assert all(torch.equal(a, b) for a, b in zip(means, _bn_running_means(prepared)))
        # Lightning restores the flags after validation by assignment, not through train()
        for module in prepared.modules():
            module.training = True
        eager.train()
        torch.testing.assert_close(prepared(images), eager(images), rtol=1e-4, atol=1e-4)  # batch statistics
        assert not torch.equal(means[0], _bn_running_means(prepared)[0])


def test_observers_move_in_training_only_and_stay_frozen(trained):
    prepared = copy.deepcopy(trained["prepared"])
    scales = _activation_scales(prepared)
    with torch.no_grad():
        prepared.eval()(IMAGES[:16] * 3)
        assert _activation_scales(prepared) == scales
        prepared.train()(IMAGES[:16] * 3)
        assert _activation_scales(prepared) != scales
        pt2e.freeze_observers(prepared)
        scales = _activation_scales(prepared)
        prepared.eval()(IMAGES[:16])
        prepared.train()(IMAGES[:16] * 5)
    assert _activation_scales(prepared) == scales


def test_frozen_batch_norm_uses_running_statistics_in_training_and_survives_the_state_dict(trained):
    prepared = copy.deepcopy(trained["prepared"])
    pt2e.freeze_bn(prepared)
    means = _bn_running_means(prepared)
    with torch.no_grad():
        prepared.train()(IMAGES[:16])
    assert all(torch.equal(a, b) for a, b in zip(means, _bn_running_means(prepared)))
    # the replay of a checkpoint: a fresh network prepared the same way takes the whole state
    replayed = pt2e.prepare(ToyConvNet(), example_inputs=(IMAGES[:4],))
    replayed.load_state_dict(prepared.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(replayed.train()(IMAGES[:16]), prepared(IMAGES[:16]))
    assert all(torch.equal(a, b) for a, b in zip(means, _bn_running_means(replayed)))


def test_bf16_autocast_trains_with_finite_scales(trained):
    prepared = copy.deepcopy(trained["prepared"]).train()
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    weight = prepared.get_parameter("conv1.weight").detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert prepared(IMAGES[:8]).dtype == torch.bfloat16
        losses = _train(prepared, optimizer, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(weight, prepared.get_parameter("conv1.weight"))
    assert all(0 < s < float("inf") for s in _activation_scales(prepared))


def test_batch_size_is_dynamic(trained):
    prepared = copy.deepcopy(trained["prepared"])
    with torch.no_grad():
        assert prepared.train()(IMAGES[:7]).shape == (7, 4)
        assert prepared.eval()(IMAGES[:1]).shape == (1, 4)
        int8 = pt2e.convert(prepared)
        assert int8(IMAGES[:1]).shape == (1, 4) and int8(IMAGES[:7]).shape == (7, 4)


def test_convert_gives_an_int8_graph_that_computes_what_the_fake_quant_model_did(trained):
    prepared = trained["prepared"]
    before = {name: t.clone() for name, t in prepared.state_dict().items() if isinstance(t, torch.Tensor)}
    reference = pt2e.frozen_copy(prepared)
    int8 = pt2e.convert(prepared)
    targets = {node.target for node in int8.graph.nodes}
    assert {_q.quantize_per_tensor.default, _q.dequantize_per_channel.default} <= targets
    assert torch.ops.aten.batch_norm.default not in targets  # folded here, not by torchao's slow fold
    assert sum(t.dtype == torch.int8 for t in [*int8.buffers(), *int8.parameters()]) == 4  # 3 convs, 1 linear
    assert not pt2e.is_pt2e_prepared(int8) and not int8.training
    with torch.no_grad():
        expected, logits = reference(IMAGES), int8(IMAGES)
    assert (expected.argmax(1) == logits.argmax(1)).float().mean() >= 0.99
    assert (logits.argmax(1) == LABELS).float().mean() >= 0.9
    check_conversion(reference, int8, (IMAGES[:64],))
    assert pt2e.is_pt2e_prepared(prepared) and prepared.training  # left as it was
    assert all(torch.equal(before[name], t) for name, t in prepared.state_dict().items() if name in before)


def test_static_calibration_with_a_skipped_module():
    torch.manual_seed(0)
    net = ToyConvNet()
    _train(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), 40)
    net.eval()
    with torch.no_grad():
        fp32 = net(IMAGES)
    prepared = pt2e.prepare(net, mode="static", skip=["fc"], example_inputs=(IMAGES[:4],))
    assert not prepared.training
    assert pt2e.calibrate(prepared, [(IMAGES[i:i + 64],) for i in range(0, 256, 64)]) == 4
    int8 = pt2e.convert(prepared)
    linear = next(node for node in int8.graph.nodes if node.target is torch.ops.aten.linear.default)
    assert linear.args[1].op == "get_attr"  # fc kept in fp32: its weight is not dequantized
    with torch.no_grad():
        assert (int8(IMAGES).argmax(1) == fp32.argmax(1)).float().mean() >= 0.95


def test_engines_are_checked_against_the_family_that_prepares_them():
    assert PT2E_ENGINES == ("x86_inductor", "xnnpack")
    with pytest.raises(ValueError, match="engine 'x86_inductor' is a pt2e engine, which this does not prepare"):
        check_engine("x86_inductor")
    with pytest.raises(ValueError, match=r"engine 'x86' is a torch-int8 engine.*it takes \['x86_inductor', 'xnnpack'\]"):
        pt2e.prepare(ToyConvNet(), "x86", example_inputs=(IMAGES[:4],))
    with pytest.raises(ValueError, match="mode must be one of"):
        pt2e.prepare(ToyConvNet(), mode="dynamic", example_inputs=(IMAGES[:4],))
    with pytest.raises(ValueError, match=r"skip names \['head'\] are not submodules of ToyConvNet"):
        pt2e.prepare(ToyConvNet(), skip=["head"], example_inputs=(IMAGES[:4],))
    with pytest.raises(ValueError, match="batch of at least 2"):
        pt2e.prepare(ToyConvNet(), example_inputs=(IMAGES[:1],))
    with pytest.raises(ValueError, match="was never prepared"):
        pt2e.convert(ToyConvNet())


def test_a_pt2e_engine_without_torchao_names_the_extra(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None if name == "torchao" else object())
    with pytest.raises(MissingExtraError, match=r"lightning-compress\[pt2e\]"):
        check_engine("x86_inductor", families=(KernelFamily.PT2E,))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None if name == "executorch" else object())
    with pytest.raises(MissingExtraError, match=r"engine='xnnpack' needs the 'executorch'.*\[executorch\]"):
        check_engine("xnnpack", families=(KernelFamily.PT2E,))


def test_a_zero_batch_norm_scale_is_refused_for_qat():
    net = ToyConvNet()
    nn.init.zeros_(net.bn2.weight)
    with pytest.raises(ValueError, match=r"gamma\) is exactly 0 in \['bn2.weight'\]"):
        pt2e.prepare(net, example_inputs=(IMAGES[:4],))
