"""The FX seam: pins the torch.ao flow so a torch upgrade that breaks it fails here, loudly."""

import copy
import os
import warnings
import zipfile

import pytest
import torch
import torch.ao.nn.quantized as nnq
import torchvision
from torch import nn

from lightning_compress.models import create_model
from lightning_compress.quantization import tracing
from lightning_compress.quantization.check import ConversionError, check_conversion
from lightning_compress.quantization.convert import clamp_to_reduced_range, convert
from lightning_compress.quantization.engines import TORCH_ENGINES, check_engine
from lightning_compress.quantization.files import load_quantized, save_quantized
from lightning_compress.quantization.prepare import (
    activation_scales,
    calibrate,
    folded_weight_and_bias,
    frozen_copy,
    prepare,
    resolve_skip,
    weight_quantization_errors,
)
from lightning_compress.quantization.qdq import qdq_network
from tests.toy import ToyConvNet


class Branchy(nn.Module):
    """Data-dependent control flow: FX cannot trace it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


class WithBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Branchy()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(torch.relu(self.conv(x))).mean((2, 3)))


def _zoo(name):
    return lambda: create_model(name, num_classes=10)


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("engine", TORCH_ENGINES)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(ToyConvNet, id="toy"),
        pytest.param("resnet20", id="resnet20"),
        pytest.param("resnet56", id="resnet56", marks=_SLOW),
        pytest.param("mobilenetv2", id="mobilenetv2", marks=_SLOW),
        pytest.param("vgg11_bn", id="vgg11_bn", marks=_SLOW),
        pytest.param(lambda: torchvision.models.resnet18(num_classes=10), id="tv-resnet18", marks=_SLOW),
        pytest.param(lambda: torchvision.models.mobilenet_v2(num_classes=10), id="tv-mobilenet_v2", marks=_SLOW),
    ],
)
def test_fx_qat_flow_still_converts_every_layer(engine, make):
    """If this fails after a torch upgrade, the seam (quantization/prepare.py, convert.py) must be revisited."""
    make = _zoo(make) if isinstance(make, str) else make
    net = make()
    params = {id(p) for p in net.parameters()}
    prepared = prepare(net, engine, mode="qat")
    assert {id(p) for p in prepared.parameters()} == params  # optimizer keeps training the real weights
    prepared(torch.randn(4, 3, 32, 32))  # 32x32: VGG pools five times
    fused = [m for m in prepared.modules() if isinstance(m, torch.ao.nn.intrinsic.qat.ConvBn2d)]
    assert fused, "Conv-BN was not fused for QAT"
    x = torch.randn(4, 3, 32, 32)
    prepared.eval()
    with torch.no_grad():
        fake = prepared(x)
    int8 = convert(prepared, engine)
    convs = [m for m in int8.modules() if isinstance(m, nn.Conv2d)]
    quantized = [m for m in int8.modules() if isinstance(m, (nnq.Conv2d, nnq.Linear))]
    assert not convs, "some convolutions stayed fp32"
    assert len(quantized) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in make().modules())
    for module in quantized:
        weight = module.weight()
        assert weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        assert torch.all(weight.q_per_channel_zero_points() == 0)
    out = int8(x)
    assert out.shape == fake.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("engine", TORCH_ENGINES)
def test_int8_matches_the_fake_quant_simulation(engine):
    prepared = prepare(ToyConvNet(), engine, mode="qat")
    for _ in range(3):
        prepared(torch.randn(16, 3, 16, 16))
    x = torch.randn(8, 3, 16, 16)
    prepared.eval()
    with torch.no_grad():
        fake = prepared(x)
    out = convert(prepared, engine)(x)
    assert float((out - fake).norm() / fake.norm()) < 0.1


def test_unknown_engine_lists_engines():
    with pytest.raises(ValueError, match=r"engine must be one of \['x86', 'onednn', 'qnnpack', 'onnxruntime', 'onnxruntime_7bit', 'onnxruntime_symmetric'\], got 'fbgemm2'"):
        check_engine("fbgemm2")


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        prepare(ToyConvNet(), mode="int4")


def test_convert_unprepared_model_fails():
    with pytest.raises(ValueError, match="was never prepared"):
        convert(ToyConvNet())


def test_untraceable_module_is_named_with_skip_hint():
    with pytest.raises(ValueError, match=r"cannot trace module 'model.gate'.*skip=\['model.gate'\]"):
        tracing.check_traceable(WithBranchy(), prefix="model.")


def test_skipped_module_stays_fp32_and_the_rest_is_int8():
    net = WithBranchy()
    prepared = prepare(net, mode="qat", skip=resolve_skip(net, ["*gate"]))
    prepared(torch.randn(2, 3, 8, 8))
    int8 = convert(prepared)
    assert isinstance(int8.get_submodule("gate"), Branchy)
    assert isinstance(int8.get_submodule("conv"), nnq.Conv2d)
    out = int8(-torch.ones(1, 3, 8, 8))
    assert torch.isfinite(out).all()


def test_skip_pattern_matching_nothing_lists_modules():
    with pytest.raises(ValueError, match=r"skip pattern 'model.head' matches no module; modules are: \['model.conv'"):
        resolve_skip(WithBranchy(), ["model.head"], prefix="model.")


def test_zeroed_weights_stay_exactly_zero_in_fake_quant_and_int8():
    net = ToyConvNet()
    mask = torch.rand_like(net.conv1.weight) < 0.5
    with torch.no_grad():
        net.conv1.weight[mask] = 0.0
    prepared = prepare(net, mode="qat")
    for _ in range(3):
        prepared(torch.randn(8, 3, 16, 16))
    conv = prepared.conv1
    fq = conv.weight_fake_quant
    assert torch.all(fq.zero_point == 0)
    folded = conv.weight * (conv.bn.weight / torch.sqrt(conv.bn.running_var + conv.bn.eps)).view(-1, 1, 1, 1)
    fake = torch.fake_quantize_per_channel_affine(folded, fq.scale, fq.zero_point.int(), 0, fq.quant_min, fq.quant_max)
    assert torch.all(fake[mask] == 0)
    int8 = convert(prepared)
    int_weights = int8.conv1.weight().int_repr()
    assert torch.all(int_weights[mask] == 0)
    assert (int_weights[~mask] != 0).float().mean() > 0.9


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("engine", ["qnnpack", "onednn"])
def test_save_and_load_round_trip_is_exact(tmp_path, engine):
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"this torch build has no {engine} engine")
    prepared = prepare(ToyConvNet(), engine, mode="qat")
    prepared(torch.randn(8, 3, 16, 16))
    int8 = convert(prepared, engine)
    path = save_quantized(int8, tmp_path / "sub" / "int8.pt", (torch.randn(1, 3, 16, 16),), engine)
    assert os.listdir(tmp_path / "sub") == ["int8.pt"]  # written via a temp file, nothing left behind
    torch.backends.quantized.engine = "x86"
    loaded = load_quantized(path)
    assert torch.backends.quantized.engine == engine  # restored from the file
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(loaded(x), int8(x))
    assert not list(loaded.children())  # frozen: weights inlined, no per-module calls at run time
    with zipfile.ZipFile(path) as archive:
        assert {record.compress_type for record in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    assert torch.equal(torch.jit.load(str(path))(x), int8(x))  # plain torch reads the deflated archive
    torch.backends.quantized.engine = "x86"


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_load_rejects_foreign_file(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match="not an int8 model written by save_quantized"):
        load_quantized(path)


def test_monitoring_values():
    prepared = prepare(ToyConvNet(), mode="qat")
    assert weight_quantization_errors(prepared) == {}  # nothing observed yet
    prepared(torch.randn(8, 3, 16, 16))
    errors = weight_quantization_errors(prepared)
    assert set(errors) == {"stem", "conv1", "conv2", "fc"}
    assert all(0 < e < 0.05 for e in errors.values())
    scales = activation_scales(prepared)
    assert "x" in scales and all(s > 0 for s in scales.values())


def test_torch_ao_deprecation_warnings_are_filtered_locally_only():
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = prepare(ToyConvNet(), mode="qat")
        prepared(torch.randn(2, 3, 16, 16))
        convert(prepared)
    assert not [w for w in caught if "torch.ao.quantization is deprecated" in str(w.message)]
    assert warnings.filters == filters_before


@pytest.mark.parametrize("engine", ["x86", "onednn"])
def test_x86_engines_do_not_saturate_on_large_activations(engine):
    """Worst case for u8 x s8 kernels without VNNI: maximal activations times maximal weights.

    Full-range (0..255) activations make pairs of products overflow int16 on AVX2 CPUs (the int8
    result comes out about half the true value); the reduced range keeps every pair in range. On a
    VNNI CPU both ranges are exact, so there this checks plain conversion accuracy.
    """
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    with torch.no_grad():
        for conv in (net[0], net[2]):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    x = torch.rand(8, 3, 4, 4) + 1.0  # every activation of the hidden layer near its observed maximum
    prepared = prepare(net, engine, mode="static")
    calibrate(prepared, [(x,)])
    int8 = convert(prepared, engine)
    expected = net(x)
    assert ((int8(x) - expected).abs().max() / expected.abs().max()).item() < 0.05
    torch.backends.quantized.engine = "x86"


class Depthwise(nn.Module):
    """Conv-BN-ReLU then a depthwise conv: the kernel whose int16 pair sums overflow for codes above 127."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.depthwise(torch.relu(self.bn(self.conv(x))))).mean((2, 3)))


@pytest.mark.parametrize("engine", ["x86", "onednn"])
def test_x86_int8_saturates_values_above_the_trained_range_as_training_did(engine):
    """Inputs 30x beyond the trained range: fake-quantization saturates them at code 127, so must int8.

    Without the clamps the int8 model gives such values codes up to 255, which the depthwise kernel's
    int16 pair sums overflow (``benchmarks/results/saturation_cost.md``: a MobileNetV2 layer 36 steps wrong).
    """
    torch.manual_seed(0)
    prepared = prepare(Depthwise(), engine, mode="qat")
    for _ in range(3):
        prepared(torch.rand(8, 3, 8, 8) * 0.1)
    reference = frozen_copy(prepared)
    int8 = convert(frozen_copy(prepared), engine)
    clamps = [n for n in int8.graph.nodes if n.target is clamp_to_reduced_range]
    assert len(clamps) >= 4  # the input, the conv, the depthwise conv, the linear each set their own range
    x = torch.rand(8, 3, 8, 8) * 3.0
    with torch.no_grad():
        expected, out = reference(x), int8(x)
    step = float(int8.get_submodule("fc").scale)
    assert (out - expected).abs().max().item() <= 3 * step
    torch.backends.quantized.engine = "x86"


class GatedDepthwise(nn.Module):
    """A product (``quantized::mul``, qparams of its own) feeding the depthwise convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.conv(x)  # a product of two factors that training never saw large together
        return self.fc(torch.relu(self.depthwise(torch.relu(x) * torch.relu(-x).flip(-1))).mean((2, 3)))


def test_x86_int8_saturates_products_above_the_trained_range_as_training_did():
    torch.manual_seed(0)
    prepared = prepare(GatedDepthwise(), "x86", mode="qat")
    for _ in range(3):
        prepared(torch.randn(8, 3, 8, 8) * 0.1)
    reference = frozen_copy(prepared)
    int8 = convert(frozen_copy(prepared), "x86")
    products = [n for n in int8.graph.nodes if str(n.target) == "quantized.mul"]
    assert products and all(user.target is clamp_to_reduced_range for n in products for user in n.users)
    x = torch.randn(8, 3, 8, 8) * 3.0
    with torch.no_grad():
        expected, out = reference(x), int8(x)
    assert (out - expected).abs().max().item() <= 3 * float(int8.get_submodule("fc").scale)


def test_converted_weights_are_the_trained_fake_quantized_weights():
    """int8 weights equal the fake-quantized (BN-folded) weights QAT trained, code for code.

    torch's fused fake-quant kernel rounds per-channel symmetric scales its own way (up to 0.4 % off
    the observer's, which conversion uses): a weight then moves by one code between training and int8.
    """
    torch.manual_seed(0)
    prepared = prepare(ToyConvNet(), "x86", mode="qat")
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.5)
    for _ in range(3):
        prepared(torch.randn(8, 3, 16, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    frozen = frozen_copy(prepared)
    int8 = convert(frozen_copy(prepared), "x86")
    checked = 0
    for name, module in frozen.named_modules():
        if not hasattr(module, "weight_fake_quant"):
            continue
        with torch.no_grad():
            trained = module.weight_fake_quant(folded_weight_and_bias(module)[0])
        converted = int8.get_submodule(name).weight().dequantize()
        assert torch.equal(converted, trained), name
        checked += 1
    assert checked == 4


class NormAct(nn.BatchNorm2d):
    """A batch norm written outside torch (as timm's ``BatchNormAct2d``): it passes ``self.training`` on."""

    def forward(self, x):
        return torch.relu(nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                   self.training, self.momentum, self.eps))


class WithNormAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = NormAct(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


def test_batch_norms_written_outside_torch_fold_into_their_conv_and_follow_the_mode():
    """Traced as they are in train mode, ``self.training`` would be frozen True: eval would use batch stats."""
    net = WithNormAct()
    assert tracing._mode_dependence(net) == (["norm"], [])
    prepared = prepare(net, "x86", mode="qat")
    assert {id(p) for p in prepared.parameters()} == {id(p) for p in net.parameters()}
    assert set(prepared.state_dict()) >= {"conv.bn.running_var", "conv.bn.num_batches_tracked"}  # folded
    for _ in range(3):
        prepared(torch.randn(8, 3, 8, 8) * 2 + 1)
    assert int(prepared.get_submodule("conv.bn").num_batches_tracked) == 3  # counted once per step
    frozen = frozen_copy(prepared)  # eval mode, quantization parameters fixed
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        alone, batched = frozen(x[:1]), frozen(x)  # batch statistics would raise at batch size 1
        assert torch.allclose(alone, batched[:1], atol=1e-6)  # running statistics: independent of the batch
        int8 = convert(frozen, "x86")
        assert torch.allclose(int8(x[:1]), int8(x)[:1])
    assert isinstance(int8.get_submodule("conv"), nnq.Conv2d) and not hasattr(int8, "norm")  # folded into the conv
    static = prepare(WithNormAct().eval(), "x86", mode="static")  # traced in eval mode: folded too
    calibrate(static, [(x,)])
    assert isinstance(convert(static, "x86").get_submodule("conv"), nnq.Conv2d)


class DropsInTraining(nn.Module):
    """Zero in training, identity in eval (as stochastic depth with p=1)."""

    def forward(self, x):
        return x * 0 if self.training else x


def test_other_modules_that_read_training_stay_fp32_leaves():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), DropsInTraining(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    prepared = prepare(net, "x86", mode="qat")
    prepared(torch.randn(4, 3, 8, 8))
    int8 = convert(frozen_copy(prepared), "x86")
    assert type(int8.get_submodule("1")) is DropsInTraining
    with torch.no_grad():
        assert frozen_copy(prepared)(torch.randn(2, 3, 8, 8)).abs().sum() > 0  # identity, not zero


class Logits(nn.Module):
    """Fixed logits per sample: 10 classes from the input's sum, with a gain (large gain: unstable)."""

    def __init__(self, gain: float, shift: int = 0):
        super().__init__()
        self.gain, self.shift = gain, shift

    def forward(self, x):
        classes = torch.arange(10, dtype=x.dtype)
        return torch.cos(x.sum((1, 2, 3))[:, None] * self.gain + classes + self.shift)


def test_check_conversion_refuses_a_different_model_of_a_stable_network():
    x = (torch.randn(16, 3, 4, 4),)
    check_conversion(Logits(0.1), Logits(0.1), x)
    with pytest.raises(ConversionError, match="computes something else"):
        check_conversion(Logits(0.1), Logits(0.1, shift=3), x)


class Fragile(nn.Module):
    """Half the samples stable (class 3), half flip to class 1 when their input moves at all.

    ``chaotic_class`` replaces the fragile half's exact-input answer; ``stable_class`` the stable half's.
    """

    def __init__(self, batch: torch.Tensor, chaotic_class: int = 0, stable_class: int = 3):
        super().__init__()
        self.batch, self.chaotic_class, self.stable_class = batch, chaotic_class, stable_class

    def forward(self, x):
        exact = (x == self.batch).flatten(1).all(1)
        classes = torch.full((len(x),), self.stable_class)
        fragile = torch.arange(len(x)) >= len(x) // 2
        classes[fragile] = torch.where(exact[fragile], self.chaotic_class, 1)
        return nn.functional.one_hot(classes, 10).float()


def test_check_conversion_judges_an_unstable_network_by_its_own_noise():
    """Inputs nudged by one 8-bit step change half this network's answers: int8 may differ there too."""
    x = torch.randn(16, 3, 4, 4)
    check_conversion(Fragile(x), Fragile(x, chaotic_class=2), (x,))  # 50 %: as the network's own noise
    with pytest.raises(ConversionError, match=r"agreement 0\.0%"):  # the stable half differs too
        check_conversion(Fragile(x), Fragile(x, chaotic_class=2, stable_class=4), (x,))


class GatedSoftmax(nn.Module):
    """A sigmoid gate and a softmax output: ops whose fixed output range is the full 0..255."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        return self.softmax(self.fc(x.mean((2, 3))))


@pytest.mark.parametrize("mode", ["qat", "static"])
def test_fixed_range_outputs_keep_their_full_range_on_x86(mode):
    """Softmax probabilities above 0.5 are codes above 127 of their fixed 1/256 grid: no clamp there."""
    torch.manual_seed(0)
    net = GatedSoftmax()
    with torch.no_grad():
        net.fc.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))  # class 0 dominates: probability ~0.9
    prepared = prepare(net, "x86", mode=mode)
    batches = [(torch.rand(8, 3, 8, 8),) for _ in range(3)]
    if mode == "qat":
        for (x,) in batches:
            prepared(x)
        reference = frozen_copy(prepared)
    else:
        calibrate(prepared, batches)
        reference = qdq_network(prepared, saturate_at_trained_range=True)
    int8 = convert(prepared, "x86")
    x = batches[0][0]
    with torch.no_grad():
        expected, out = reference(x), int8(x)
    assert expected.max() > 0.8
    assert (out - expected).abs().max().item() <= 2 / 256


def test_calibrated_x86_reference_saturates_where_the_int8_model_does():
    """The QDQ form of a calibrated x86 model saturates at code 127 as its int8 model does (the conversion check's
    reference, and the shipped file)."""
    torch.manual_seed(0)
    prepared = prepare(Depthwise().eval(), "x86", mode="static")
    calibrate(prepared, [(torch.rand(8, 3, 8, 8) * 0.1,)])
    int8 = convert(copy.deepcopy(prepared), "x86")
    x = torch.rand(8, 3, 8, 8) * 3.0  # 30x the calibrated range
    step = float(int8.get_submodule("fc").scale)
    with torch.no_grad():
        saturated, full_range, out = (qdq_network(prepared)(x), qdq_network(prepared, saturate_at_trained_range=False)(x),
                                      int8(x))
    assert (out - saturated).abs().max().item() <= 3 * step
    assert (out - full_range).abs().max().item() > 3 * step  # without the saturation: codes up to 255


class HeadDropout(nn.Module):
    """timm's classifier head: ``F.dropout(..., training=self.training)`` in the network's own forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(nn.functional.dropout(x, p=0.9, training=self.training))


def test_functional_dropout_follows_the_mode_after_preparation():
    net = HeadDropout()
    assert tracing._mode_dependence(net) == ([], [""])
    prepared = prepare(net, "x86", mode="qat")
    x = torch.rand(16, 3, 8, 8)
    prepared(x)
    frozen = frozen_copy(prepared)
    with torch.no_grad():
        assert torch.equal(frozen(x), frozen(x))  # eval: no dropout
        frozen.train()
        assert not torch.equal(frozen(x), frozen(x))  # train: dropout
    int8 = convert(frozen_copy(prepared), "x86")
    assert isinstance(int8.get_submodule("fc"), nnq.Linear)


class NoisyInTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        return x + torch.randn_like(x) if self.training else x


def test_network_whose_own_forward_depends_on_the_mode_is_refused_up_front():
    with pytest.raises(ValueError, match=r"cannot quantize 'model': its own forward behaves differently in train "
                                         r"and eval mode .* move that code into a submodule"):
        tracing.check_mode_independent(NoisyInTraining(), prefix="model.")
    with pytest.raises(ValueError, match="its own forward behaves differently"):
        prepare(NoisyInTraining(), "x86", mode="qat")
    wrapped = nn.Sequential(NoisyInTraining(), nn.Conv2d(8, 2, 1))  # as a submodule it is an fp32 leaf
    tracing.check_mode_independent(wrapped)
    assert type(prepare(wrapped, "x86", mode="qat").get_submodule("0")) is NoisyInTraining
