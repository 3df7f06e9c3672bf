"""The int8 QDQ ONNX model: built from the learned quantization parameters, run by onnxruntime, checked."""

from __future__ import annotations

import onnxruntime
import pytest
import torch
from torch import nn

from lightning_compress.core.comparison import parity
from lightning_compress.core.onnx import OnnxRuntimeNetwork
from lightning_compress.export.onnx import quantization_summary
from lightning_compress.quantization import QuantizationAwareTraining
from lightning_compress.quantization.prepare import calibrate, frozen_copy, is_prepared, prepare
from lightning_compress.quantization.qdq import qdq_network, qdq_onnx_bytes
from lightning_compress.quantization.ptq import PostTrainingQuantization, quantize_static
from tests.toy import ToyConvNet, UserClassifier, random_images, random_loader


def trained_qat(engine: str, steps: int = 60) -> nn.Module:
    """ToyConvNet trained with fake-quantization on the learnable random images: predictions vary by input."""
    torch.manual_seed(0)
    prepared = prepare(ToyConvNet(), engine, mode="qat")
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
    data = random_images(256)
    for step in range(steps):
        x, y = data.tensors[0][step % 8 * 32:][:32], data.tensors[1][step % 8 * 32:][:32]
        nn.functional.cross_entropy(prepared(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return prepared


@pytest.fixture(scope="module", params=["onnxruntime", "onnxruntime_7bit", "onnxruntime_symmetric"])
def qat_model(request):
    return request.param, trained_qat(request.param)


def test_qdq_onnx_computes_what_the_fake_quant_model_computes(qat_model):
    engine, prepared = qat_model
    images, labels = random_images(256, seed=1).tensors
    reference = frozen_copy(prepared)
    with torch.no_grad():
        expected = reference(images)
    assert len(set(expected.argmax(1).tolist())) >= 3, "the model must predict by input, not one class"
    onnx_model = OnnxRuntimeNetwork(qdq_onnx_bytes(qdq_network(prepared), images[:1]), threads=1)
    result = parity(expected, onnx_model(images), labels, tolerance=0.0)
    assert result.top1_agreement == 1.0  # same numerics: not even a near-tie flips
    assert result.max_logit_error < 0.02  # float rounding at a quantization boundary, at most a step
    assert result.accuracy == result.reference_accuracy > 0.6
    with torch.no_grad():  # the frozen copy's scales did not move while it ran
        assert torch.equal(reference(images), expected)


def test_symmetric_engine_writes_the_qdq_structure_tensorrt_reads(qat_model):
    engine, prepared = qat_model
    summary = quantization_summary(qdq_onnx_bytes(qdq_network(prepared), torch.randn(1, 3, 16, 16)))
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= summary["ops"]
    assert len(summary["weights"]) == 4 and all(w == ("int8", 0, True) for w in summary["weights"])
    points = set(summary["activation_zero_points"])
    if engine == "onnxruntime_symmetric":  # TensorRT: int8 activations, zero-point 0 everywhere
        assert points == {("int8", 0)}
    else:  # onnxruntime's U8S8: uint8 activations, affine
        assert {dtype for dtype, _ in points} == {"uint8"} and len(points) > 1


def test_onnxruntime_runs_the_qdq_model_with_int8_kernels(qat_model, tmp_path):
    _, prepared = qat_model
    blob = qdq_onnx_bytes(qdq_network(prepared), torch.randn(1, 3, 16, 16))
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops  # every convolution fused into an int8 kernel


def test_onnx_network_survives_deepcopy_and_state_dict():
    import copy

    net = OnnxRuntimeNetwork(qdq_onnx_bytes(qdq_network(trained_qat("onnxruntime", 2)), torch.randn(1, 3, 16, 16)))
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(copy.deepcopy(net)(x), net(x))
    other = OnnxRuntimeNetwork(qdq_onnx_bytes(qdq_network(trained_qat("onnxruntime", 1)), x[:1]))
    other.load_state_dict(net.state_dict())
    assert torch.equal(other(x), net(x))


def test_qat_with_the_onnxruntime_engine_tests_the_shipped_model(make_trainer):
    module = UserClassifier()
    qat = QuantizationAwareTraining(engine="onnxruntime")
    make_trainer([qat], max_steps=12, max_epochs=None).fit(module, random_loader(192, shuffle=True))
    assert isinstance(module.net, OnnxRuntimeNetwork)
    result = make_trainer([qat]).test(module, random_loader(64, seed=3), verbose=False)
    assert result[0]["test_acc"] > 0.5


class _RankLoser(nn.Module):
    """Runs in fake-quant, fails once converted (like channels_last kernels on rank-3 input)."""

    def forward(self, x):
        if not x.is_floating_point() or (hasattr(x, "is_quantized") and x.is_quantized):
            raise RuntimeError("required rank 4 tensor to use channels_last format")
        return x


class _Fragile(UserClassifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_a_failing_conversion_names_the_module_and_keeps_the_fake_quant_model(make_trainer):
    module = _Fragile()
    qat = QuantizationAwareTraining(engine="x86")
    with pytest.MonkeyPatch.context() as patch:  # the int8 Linear raises as a kernel without support would
        import torch.ao.nn.quantized as nnq

        def broken(self, x):
            raise RuntimeError("required rank 4 tensor to use channels_last format")

        patch.setattr(nnq.Linear, "forward", broken)
        with pytest.warns(UserWarning, match=r"fails on a calibration batch in module 'net.4'.*skip=\['net.4'\]"):
            make_trainer([qat], max_steps=2, max_epochs=None).fit(module, random_loader(64))
    assert is_prepared(module.net)  # the fake-quant model stayed: nothing is lost
    assert make_trainer([qat]).test(module, random_loader(16), verbose=False)[0]["test_acc"] >= 0


@pytest.mark.parametrize("engine", ["x86", "onnxruntime"])
def test_ptq_checks_its_conversion(engine):
    net = ToyConvNet().eval()
    images = random_images(64).tensors[0]
    int8 = quantize_static(net, [(images[i:i + 16],) for i in range(0, 64, 16)], engine=engine)
    with torch.no_grad():
        assert parity(net(images), int8(images), tolerance=0.05).agreement > 0.9


def test_ptq_callback_with_onnxruntime_puts_the_onnx_model_in_place(make_trainer):
    module = UserClassifier()
    make_trainer([PostTrainingQuantization(calibration_batches=2, engine="onnxruntime")], max_steps=4,
                 max_epochs=None).fit(module, random_loader(64))
    assert isinstance(module.net, OnnxRuntimeNetwork)


class _ClampNet(nn.Module):
    """Convolutions each followed by a bounded activation, in the three forms FX sees: module, F.relu6, F.hardtanh."""

    def __init__(self, width: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.conv1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)  # depthwise, as MobileNetV2
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self.conv1(self.stem(x)))
        x = nn.functional.hardtanh(self.conv2(x), 0.0, 4.0)
        return self.fc(x.mean((2, 3)))


FLOAT_COMPUTE = {"Conv", "FusedConv", "Clip", "Relu", "Gemm", "MatMul", "Add", "Mul", "Div", "Sub"}


def optimized_ops(blob: bytes, tmp_path) -> list[str]:
    """Op types of the graph onnxruntime actually runs (all optimizations: QDQ fusion, layout)."""
    import onnx

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    onnxruntime.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.fixture(scope="module")
def clamp_qat() -> nn.Module:
    """_ClampNet trained with the onnxruntime engine's fake-quantization: predictions vary by input."""
    torch.manual_seed(0)
    prepared = prepare(_ClampNet(), "onnxruntime", mode="qat")
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
    images, labels = random_images(256).tensors
    for step in range(60):
        x, y = images[step % 8 * 32:][:32], labels[step % 8 * 32:][:32]
        nn.functional.cross_entropy(prepared(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return prepared


def test_clamps_join_their_convolution_and_the_qdq_model_keeps_the_fake_quant_numerics(clamp_qat, tmp_path):
    prepared = clamp_qat
    # no fake-quantizer between a convolution and its clamp: input, the three clamps' outputs, the logits
    activations = {id(getattr(prepared, node.target)) for node in prepared.graph.nodes
                   if node.op == "call_module" and node.target.startswith("activation_post_process")}
    assert len(activations) == 5, prepared.code
    qdq = qdq_network(prepared)
    left = [node for node in qdq.graph.nodes if "relu6" in str(node.target) or "hardtanh" in str(node.target)
            or isinstance(getattr(qdq, str(node.target), None), nn.Hardtanh)]
    assert not left, f"clamps the next quantization makes redundant were kept: {left}"
    test_images, test_labels = random_images(256, seed=1).tensors
    with torch.no_grad():
        expected = frozen_copy(prepared)(test_images)
    assert len(set(expected.argmax(1).tolist())) >= 3
    blob = qdq_onnx_bytes(qdq, test_images[:1])
    result = parity(expected, OnnxRuntimeNetwork(blob, threads=1)(test_images), test_labels, tolerance=0.0)
    assert result.top1_agreement == 1.0 and result.max_logit_error < 0.02
    ops = optimized_ops(blob, tmp_path)
    assert ops.count("QLinearConv") == 3 and not FLOAT_COMPUTE & set(ops), ops


def test_a_clamp_stays_where_the_quantization_after_it_does_not_saturate(clamp_qat):
    import copy

    from lightning_compress.quantization.qdq import QuantizeDequantize

    assert QuantizeDequantize(6 / 255, 0, torch.uint8).saturates_outside(0.0, 6.0)
    assert not QuantizeDequantize(8 / 255, 0, torch.uint8).saturates_outside(0.0, 6.0)  # 6 is code 191 of 255
    assert not QuantizeDequantize(6 / 255, 1, torch.uint8).saturates_outside(0.0, 6.0)  # code 0 is -1 step
    assert not QuantizeDequantize(6 / 127, 0, torch.int8).saturates_outside(0.0, 6.0)  # negatives representable
    prepared = copy.deepcopy(clamp_qat)
    images = random_images(64, seed=1).tensors[0]
    with torch.no_grad():
        after_stem = next(getattr(prepared, node.target) for node in prepared.graph.nodes
                          if node.op == "call_module" and node.args and str(node.args[0]) == "stem_2")
        after_stem.scale.fill_(8 / 255)  # wider than ReLU6's [0, 6]: the clamp is not redundant
        qdq = qdq_network(prepared)
    assert [type(m) for m in qdq.modules()].count(nn.ReLU6) == 1
    assert not any(node.target in (nn.functional.relu6, nn.functional.hardtanh) for node in qdq.graph.nodes)
    with torch.no_grad():
        expected = qdq(images)
        assert expected.argmax(1).unique().numel() >= 2
    onnx_model = OnnxRuntimeNetwork(qdq_onnx_bytes(qdq, images[:1]), threads=1)
    assert parity(expected, onnx_model(images), tolerance=0.0).top1_agreement == 1.0


@pytest.mark.parametrize("mode", ["static", "qat"])
def test_mobilenetv2_int8_onnx_runs_every_convolution_in_int8(mode, tmp_path):
    from lightning_compress.models import create_model

    torch.manual_seed(0)
    net = create_model("mobilenetv2", num_classes=10, width_mult=0.5)
    prepared = prepare(net.train(mode == "qat"), "onnxruntime", mode=mode)
    images = torch.randn(16, 3, 32, 32)
    if mode == "qat":
        with torch.no_grad():
            prepared(images)
    else:
        calibrate(prepared, [(images,)])
    ops = optimized_ops(qdq_onnx_bytes(qdq_network(prepared), images[:1]), tmp_path)
    convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert ops.count("QLinearConv") == convs and ops.count("QLinearAdd") == 10
    assert not FLOAT_COMPUTE & set(ops), sorted(set(ops))  # ReLU6 once left DQ -> Clip -> Q between every two
    assert ops.count("QuantizeLinear") <= 3  # input, pooled features, classifier input


@pytest.mark.parametrize("engine", ["onnxruntime", pytest.param("onnxruntime_symmetric", marks=pytest.mark.extended)])
def test_efficientnet_b0_ships_as_qdq_onnx_after_quantization_aware_training(engine):
    """Squeeze-excitation, SiLU and stochastic depth (an fp32 leaf that follows the mode) through the ONNX engines
    (the symmetric one under ``-m extended``: half a minute, and ``test_qat``/``test_backend`` cover it on small nets)."""
    import warnings

    import lightning.pytorch as pl
    import torchvision

    from lightning_compress import ImageClassifier

    torch.manual_seed(0)
    network = torchvision.models.efficientnet_b0(num_classes=10)
    # batch-norm statistics of the data seen (cumulative), as a trained network has: with torchvision's momentum
    # (0.01) three steps leave them at their initial values, eval-mode activations saturate, and the conversion
    # check's verdict turned on which CPU's int8 kernels rounded a value one step differently. 64x64 images: at
    # 32x32 the last stages see one pixel per image, statistics of 12 values amplify a one-step rounding into
    # other answers, and the verdict was again the CPU's (it failed on an AVX-512 EPYC)
    for layer in network.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None
    module = ImageClassifier(model=network, num_classes=10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 3, 64, 64),
                                                                        torch.randint(0, 10, (12,))), batch_size=12)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_test_batches=1,
                         callbacks=[QuantizationAwareTraining(engine=engine)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    assert not [w for w in caught if "conversion" in str(w.message)]
    assert isinstance(module.model, OnnxRuntimeNetwork)
    assert trainer.test(module, loader, verbose=False)[0]["test/acc"] >= 0
