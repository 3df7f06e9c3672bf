"""The FX seam: pins the torch.ao flow so a torch upgrade that breaks it fails here, loudly."""

import os
import warnings
import zipfile

import pytest
import torch
import torch.ao.nn.quantized as nnq
import torchvision
from torch import nn

from lightning_compress.models import create_model
from lightning_compress.quantization import backend
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


@pytest.mark.parametrize("engine", backend.TORCH_ENGINES)
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
    """If this fails after a torch upgrade, the backend (backend.py) must be revisited."""
    make = _zoo(make) if isinstance(make, str) else make
    net = make()
    params = {id(p) for p in net.parameters()}
    prepared = backend.prepare(net, engine, mode="qat")
    assert {id(p) for p in prepared.parameters()} == params  # optimizer keeps training the real weights
    prepared(torch.randn(4, 3, 32, 32))  # 32x32: VGG pools five times
    fused = [m for m in prepared.modules() if isinstance(m, torch.ao.nn.intrinsic.qat.ConvBn2d)]
    assert fused, "Conv-BN was not fused for QAT"
    x = torch.randn(4, 3, 32, 32)
    prepared.eval()
    with torch.no_grad():
        fake = prepared(x)
    int8 = backend.convert(prepared, engine)
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


@pytest.mark.parametrize("engine", backend.TORCH_ENGINES)
def test_int8_matches_the_fake_quant_simulation(engine):
    prepared = backend.prepare(ToyConvNet(), engine, mode="qat")
    for _ in range(3):
        prepared(torch.randn(16, 3, 16, 16))
    x = torch.randn(8, 3, 16, 16)
    prepared.eval()
    with torch.no_grad():
        fake = prepared(x)
    out = backend.convert(prepared, engine)(x)
    assert float((out - fake).norm() / fake.norm()) < 0.1


def test_unknown_engine_lists_engines():
    with pytest.raises(ValueError, match=r"engine must be one of \['x86', 'onednn', 'qnnpack', 'onnxruntime', 'onnxruntime_symmetric'\], got 'fbgemm2'"):
        backend.check_engine("fbgemm2")


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        backend.prepare(ToyConvNet(), mode="int4")


def test_convert_unprepared_model_fails():
    with pytest.raises(ValueError, match="was never prepared"):
        backend.convert(ToyConvNet())


def test_untraceable_module_is_named_with_skip_hint():
    with pytest.raises(ValueError, match=r"cannot trace module 'model.gate'.*skip=\['model.gate'\]"):
        backend.check_traceable(WithBranchy(), prefix="model.")


def test_skipped_module_stays_fp32_and_the_rest_is_int8():
    net = WithBranchy()
    prepared = backend.prepare(net, mode="qat", skip=backend.resolve_skip(net, ["*gate"]))
    prepared(torch.randn(2, 3, 8, 8))
    int8 = backend.convert(prepared)
    assert isinstance(int8.get_submodule("gate"), Branchy)
    assert isinstance(int8.get_submodule("conv"), nnq.Conv2d)
    out = int8(-torch.ones(1, 3, 8, 8))
    assert torch.isfinite(out).all()


def test_skip_pattern_matching_nothing_lists_modules():
    with pytest.raises(ValueError, match=r"skip pattern 'model.head' matches no module; modules are: \['model.conv'"):
        backend.resolve_skip(WithBranchy(), ["model.head"], prefix="model.")


def test_zeroed_weights_stay_exactly_zero_in_fake_quant_and_int8():
    net = ToyConvNet()
    mask = torch.rand_like(net.conv1.weight) < 0.5
    with torch.no_grad():
        net.conv1.weight[mask] = 0.0
    prepared = backend.prepare(net, mode="qat")
    for _ in range(3):
        prepared(torch.randn(8, 3, 16, 16))
    conv = prepared.conv1
    fq = conv.weight_fake_quant
    assert torch.all(fq.zero_point == 0)
    folded = conv.weight * (conv.bn.weight / torch.sqrt(conv.bn.running_var + conv.bn.eps)).view(-1, 1, 1, 1)
    fake = torch.fake_quantize_per_channel_affine(folded, fq.scale, fq.zero_point.int(), 0, fq.quant_min, fq.quant_max)
    assert torch.all(fake[mask] == 0)
    int8 = backend.convert(prepared)
    int_weights = int8.conv1.weight().int_repr()
    assert torch.all(int_weights[mask] == 0)
    assert (int_weights[~mask] != 0).float().mean() > 0.9


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("engine", ["qnnpack", "onednn"])
def test_save_and_load_round_trip_is_exact(tmp_path, engine):
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"this torch build has no {engine} engine")
    prepared = backend.prepare(ToyConvNet(), engine, mode="qat")
    prepared(torch.randn(8, 3, 16, 16))
    int8 = backend.convert(prepared, engine)
    path = backend.save_quantized(int8, tmp_path / "sub" / "int8.pt", (torch.randn(1, 3, 16, 16),), engine)
    assert os.listdir(tmp_path / "sub") == ["int8.pt"]  # written via a temp file, nothing left behind
    torch.backends.quantized.engine = "x86"
    loaded = backend.load_quantized(path)
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
        backend.load_quantized(path)


def test_monitoring_values():
    prepared = backend.prepare(ToyConvNet(), mode="qat")
    assert backend.weight_quantization_errors(prepared) == {}  # nothing observed yet
    prepared(torch.randn(8, 3, 16, 16))
    errors = backend.weight_quantization_errors(prepared)
    assert set(errors) == {"stem", "conv1", "conv2", "fc"}
    assert all(0 < e < 0.05 for e in errors.values())
    scales = backend.activation_scales(prepared)
    assert "x" in scales and all(s > 0 for s in scales.values())


def test_torch_ao_deprecation_warnings_are_filtered_locally_only():
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = backend.prepare(ToyConvNet(), mode="qat")
        prepared(torch.randn(2, 3, 16, 16))
        backend.convert(prepared)
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
    prepared = backend.prepare(net, engine, mode="static")
    backend.calibrate(prepared, [(x,)])
    int8 = backend.convert(prepared, engine)
    expected = net(x)
    assert ((int8(x) - expected).abs().max() / expected.abs().max()).item() < 0.05
    torch.backends.quantized.engine = "x86"
