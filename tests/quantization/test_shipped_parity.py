"""The shipped QDQ ONNX file computes what the in-process int8 network (what ``trainer.test()`` runs) computes,
for every engine, also on images beyond the range the network was trained on."""

from __future__ import annotations

import copy

import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper

from lightning_compress.core.comparison import parity
from lightning_compress.core.onnx import OnnxRuntimeNetwork
from lightning_compress.export import export_artifacts
from lightning_compress.quantization.convert import convert
from lightning_compress.quantization.engines import ENGINE_TABLE, ENGINES, KernelFamily
from lightning_compress.quantization.qdq import qdq_network, qdq_onnx_bytes
from tests.quantization.test_deploy import trained_qat
from tests.toy import random_images

METADATA = {"model": "toy", "num_classes": 4, "model_kwargs": {}, "classes": ["0", "1", "2", "3"],
            "mean": [0.0] * 3, "std": [1.0] * 3, "input_size": [16, 16]}
QDQ_SHIPPED = (KernelFamily.TORCH_INT8, KernelFamily.QDQ_ONNX)  # the engines whose export is the QDQ ONNX file


def int8_weight_codes(model: bytes) -> list:
    """The int8 weight tensors (conv and linear) a QDQ ONNX model dequantizes."""
    graph = onnx.load_from_string(model).graph
    dequantized = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    return [numpy_helper.to_array(t) for t in graph.initializer
            if t.name in dequantized and t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]


def shippable(engine: str) -> None:
    family = ENGINE_TABLE[engine].family
    if family not in QDQ_SHIPPED:
        pytest.skip(f"{engine} ships as {ENGINE_TABLE[engine].runtime}, not the QDQ ONNX file")
    if family is KernelFamily.TORCH_INT8 and engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"torch build without {engine}")


@pytest.mark.parametrize("engine", ENGINES)
def test_shipped_file_agrees_with_the_int8_network_test_measures(engine, tmp_path):
    shippable(engine)
    prepared = trained_qat(engine)
    images, labels = random_images(1000, seed=1).tensors
    images = images * 1.2  # real test images go beyond the range calibrated on training batches
    int8 = convert(copy.deepcopy(prepared), engine, (images[:1],))
    result = export_artifacts(prepared, METADATA, tmp_path / "out", images[:256], labels[:256], "test images",
                              only=["onnx_int8"])
    assert result.manifest["artifacts"]["onnx_int8"]["status"] == "written"
    shipped = OnnxRuntimeNetwork((tmp_path / "out" / "model_int8.onnx").read_bytes(), threads=1)
    with torch.no_grad():
        measured = int8(images)
    assert len(set(measured.argmax(1).tolist())) >= 3, "the network must predict by input, not one class"
    agreement = parity(measured, shipped(images), labels, tolerance=0.0)
    assert agreement.top1_agreement >= 0.995
    assert abs(agreement.accuracy - agreement.reference_accuracy) <= 0.001


def test_x86_saturation_is_a_clip_of_the_codes_and_every_convolution_stays_int8(tmp_path):
    prepared = trained_qat("x86", steps=2)
    blob = qdq_onnx_bytes(qdq_network(prepared), torch.randn(1, 3, 16, 16))
    graph = onnx.load_from_string(blob).graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    clips = [node for node in graph.node if node.op_type == "Clip"]
    assert clips and all(producers[clip.input[0]] == "QuantizeLinear" for clip in clips)  # on codes, not floats
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 3 and not {"Conv", "FusedConv"} & set(ops)


def test_default_engine_tests_the_very_file_export_ships(tmp_path):
    from lightning_compress.commands.checkpoint import load_checkpoint
    from lightning_compress.module import ImageClassifier
    from lightning_compress.quantization import QuantizationAwareTraining
    from tests.test_commands import trainer as make_trainer
    from tests.toy import random_loader

    torch.manual_seed(0)
    qat = QuantizationAwareTraining(start="20steps", convert_on_fit_end=False)
    assert qat.engine.name == "onnxruntime"
    model = ImageClassifier("resnet20", num_classes=4, lr=0.05)
    fit = make_trainer(tmp_path, [qat], steps=40)
    fit.fit(model, random_loader(256, batch_size=16, shuffle=True, num_classes=4), random_loader(16, batch_size=16))
    fit.save_checkpoint(tmp_path / "qat.ckpt")
    in_process = qat.convert(model)  # no example inputs: the shapes recorded at start
    assert isinstance(in_process, OnnxRuntimeNetwork) and model.model is in_process
    images, labels = random_images(256, seed=1).tensors
    loaded = load_checkpoint(tmp_path / "qat.ckpt")
    export_artifacts(loaded.network, loaded.metadata, tmp_path / "out", images, labels, only=["onnx_int8"],
                     latency_repeats=0)
    shipped = OnnxRuntimeNetwork((tmp_path / "out" / "model_int8.onnx").read_bytes(), threads=1)
    with torch.no_grad():
        expected, got = in_process(images), shipped(images)
    assert len(set(expected.argmax(1).tolist())) >= 2
    assert torch.equal(expected, got)  # not close: the same numbers
    loader = random_loader(256, batch_size=16, num_classes=4)
    x, y = loader.dataset.tensors
    tested = make_trainer(tmp_path).test(model, loader, verbose=False)[0]["test/acc"]
    with torch.no_grad():
        assert tested == pytest.approx(float((shipped(x).argmax(1) == y).float().mean()), abs=1e-6)


def test_7bit_weights_compute_the_same_codes_without_onnxruntimes_exact_mode():
    from lightning_compress.core.onnx import onnx_session

    prepared = trained_qat("onnxruntime_7bit")
    blob = qdq_onnx_bytes(qdq_network(prepared), torch.randn(1, 3, 16, 16))
    weights = int8_weight_codes(blob)
    assert len(weights) == 4 and max(int(abs(w).max()) for w in weights) == 63  # each channel's largest is 63
    images = random_images(256, seed=1).tensors[0] * 4  # activations at the top of their range
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    default = onnxruntime.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    exact = onnx_session(blob)
    name = default.get_inputs()[0].name
    # on a CPU without VNNI the exact mode converts layers whose weights leave -64..63; these run as by default
    assert (default.run(None, {name: images.numpy()})[0] == exact.run(None, {name: images.numpy()})[0]).all()
