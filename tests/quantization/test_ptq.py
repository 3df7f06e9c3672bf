"""Post-training quantization: static (calibrated) and dynamic, as functions and as a callback."""

import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn

from lightning_compress.quantization import PostTrainingQuantization, QuantizationAwareTraining, quantize_dynamic, quantize_static
from tests.toy import ToyConvNet, UserClassifier, random_images, random_loader


def test_quantize_static_is_close_to_fp32_and_leaves_the_network_alone():
    net = ToyConvNet().eval()
    x = random_images(64).tensors[0]
    reference = net(x)
    int8 = quantize_static(net, [(x[i : i + 16],) for i in range(0, 64, 16)], engine="x86")
    assert isinstance(net.conv1, nn.Conv2d)  # original untouched
    assert isinstance(int8.conv1, nnq.Conv2d)
    error = (int8(x) - reference).norm() / reference.norm()
    assert error < 0.05


@pytest.mark.parametrize("engine", ["onnxruntime", "x86", pytest.param("xnnpack", marks=pytest.mark.slow)])
def test_quantize_static_without_check_converts_what_the_check_would_refuse(monkeypatch, engine):
    """``check=False`` (a model built to be timed) converts without comparing: a check that refuses every model
    stops the default call and is never reached without it."""
    if engine == "xnnpack":
        pytest.importorskip("executorch")
    from lightning_compress.quantization import families
    from lightning_compress.quantization.check import ConversionError

    def refuse(*args, **kwargs):
        raise ConversionError("refused")

    monkeypatch.setattr(families, "check_conversion", refuse)
    net = ToyConvNet().eval()
    x = random_images(16).tensors[0]
    with pytest.raises(ConversionError, match="refused"):
        quantize_static(net, [(x,)], engine=engine)
    int8 = quantize_static(net, [(x,)], engine=engine, check=False)
    assert int8(x).shape == net(x).shape


def test_quantize_static_needs_batches():
    with pytest.raises(ValueError, match="at least one calibration batch"):
        quantize_static(ToyConvNet(), [])


def test_quantize_dynamic_changes_only_linear_layers():
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    int8 = quantize_dynamic(net, engine="qnnpack", skip="2")
    assert isinstance(int8.get_submodule("0"), nnqd.Linear)
    assert type(int8.get_submodule("2")) is nn.Linear  # skipped
    assert (int8(x) - net(x)).abs().max() < 0.05


def test_callback_calibrates_at_fit_end_and_test_runs_int8(make_trainer):
    model = UserClassifier()
    trainer = make_trainer([PostTrainingQuantization(calibration_batches=2, engine="x86")], max_epochs=3)
    trainer.fit(model, random_loader())
    assert isinstance(model.net.conv1, nnq.Conv2d)
    assert trainer.test(model, random_loader(), verbose=False)[0]["test_acc"] > 0.4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"calibration_batches": 0}, "calibration_batches must be an int >= 1"), ({"engine": "tpu"}, "engine must be one of")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PostTrainingQuantization(**kwargs)


def test_conflicts_with_qat_before_training(make_trainer):
    trainer = make_trainer([PostTrainingQuantization(), QuantizationAwareTraining()], max_steps=2)
    with pytest.raises(ValueError, match="(PostTrainingQuantization|QuantizationAwareTraining) and (PostTrainingQuantization|QuantizationAwareTraining) each quantizes"):
        trainer.fit(UserClassifier(), random_loader())
    assert trainer.global_step == 0
