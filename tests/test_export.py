"""Packed weights restore exactly; exports are all-or-nothing; ONNX agrees with torch; QAT -> int8 files."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_compress.export import (
    OnnxRuntimeNetwork,
    build_network,
    export_artifacts,
    int8_weight_quantization,
    load_artifact,
    onnx_bytes,
    pack_state_dict,
    parity,
    read_packed,
    unpack_state_dict,
    write_packed,
)
from lightning_compress.quantization import QuantizationAwareTraining
from tests.test_commands import write_checkpoint
from tests.toy import ToyConvNet, random_images

META = {"model": "resnet20", "num_classes": 4, "model_kwargs": {}, "classes": list("abcd"),
        "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [16, 16]}


def sparse_state(sparsity: float = 0.9) -> dict[str, torch.Tensor]:
    state = ToyConvNet().state_dict()
    for name, t in state.items():
        if t.dim() >= 2:
            t.mul_(torch.rand_like(t) >= sparsity)
    return state


@pytest.mark.parametrize("codec", ["lzma", "zlib"])
def test_fp16_packing_is_bit_exact(codec):
    state = sparse_state()
    restored, _ = unpack_state_dict(pack_state_dict(state, values="fp16", codec=codec))
    assert list(restored) == list(state)
    for name, t in state.items():
        assert restored[name].dtype == t.dtype
        expected = t.half().float() if t.dim() >= 2 else t  # weights rounded to fp16, the rest raw
        assert torch.equal(restored[name].view(torch.uint8) if t.is_floating_point() else restored[name],
                           expected.view(torch.uint8) if t.is_floating_point() else expected)
    # an fp16-representable weight comes back exactly as it was
    exact = {"w": torch.randn(8, 8).half().float()}
    assert torch.equal(unpack_state_dict(pack_state_dict(exact, values="fp16"))[0]["w"], exact["w"])


def test_int8_packing_restores_the_exact_dequantized_values(tmp_path):
    state = sparse_state()
    write_packed(tmp_path / "w.lcpk", state, {"note": 1}, values="int8")
    restored, meta = read_packed(tmp_path / "w.lcpk")
    assert meta == {"note": 1}
    for name, t in state.items():
        if t.dim() >= 2:
            flat = t.reshape(t.shape[0], -1)
            amax = flat.abs().amax(1)
            scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row keeps scale 1
            expected = (torch.round(flat / scale[:, None]).clamp(-127, 127) * scale[:, None]).reshape(t.shape)
            assert torch.equal(restored[name], expected)
            assert not restored[name][t == 0].any()  # pruned zeros stay zero
        else:
            assert torch.equal(restored[name], t)


def test_sparse_weights_pack_far_smaller_than_fp32():
    dense = {"w": torch.randn(256, 256)}
    sparse = {"w": dense["w"] * (torch.rand(256, 256) > 0.9)}
    dense_bytes, sparse_bytes = (len(pack_state_dict(s, values="int8")) for s in (dense, sparse))
    assert dense_bytes < 256 * 256 * 1.05  # int8: about 1 byte per weight
    assert sparse_bytes < 0.3 * dense_bytes  # bitmask + 10 % values
    q, scale = int8_weight_quantization(sparse["w"])
    assert q.dtype == torch.int8 and scale.shape == (256,)


def test_damaged_artifact_is_named(tmp_path):
    good = pack_state_dict({"w": torch.ones(4, 4)})
    (tmp_path / "cut.lcpk").write_bytes(good[:-10])
    with pytest.raises(ValueError, match="cut.lcpk: damaged packed artifact"):
        read_packed(tmp_path / "cut.lcpk")
    (tmp_path / "model.bin").write_bytes(good)
    with pytest.raises(ValueError, match="unknown model file type '.bin'"):
        load_artifact(tmp_path / "model.bin")


def trained_toy(steps: int = 40, zoo: bool = False) -> torch.nn.Module:
    """ToyConvNet (or the zoo's resnet20, which packed artifacts can rebuild) trained on the learnable random
    images: its predictions vary with the input."""
    torch.manual_seed(0)
    net = build_network(META).train() if zoo else ToyConvNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = random_images(256).tensors
    for step in range(steps):
        torch.nn.functional.cross_entropy(net(x[step % 8 * 32:][:32]), y[step % 8 * 32:][:32]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return net.eval()


def test_onnx_export_computes_what_torch_computes():
    net = trained_toy()
    images, labels = random_images(128, seed=1).tensors
    with torch.no_grad():
        expected = net(images)
    assert len(set(expected.argmax(1).tolist())) >= 3  # a model that predicts by input, not one class
    result = parity(expected, OnnxRuntimeNetwork(onnx_bytes(net, images[:1], META))(images), labels, tolerance=0.0)
    assert result.top1_agreement == 1.0 and result.max_logit_error < 1e-4
    assert result.accuracy == result.reference_accuracy > 0.6


def test_a_refused_artifact_does_not_cost_the_others(tmp_path):
    net = trained_toy(zoo=True)
    # computes one thing in eager mode and another once exported: an exporter bug, in miniature
    net.fc.register_forward_hook(lambda module, args, out: out.flip(1) if torch.compiler.is_exporting() else out)
    images, labels = random_images(64, seed=1).tensors
    result = export_artifacts(net, META, tmp_path / "out", images, labels, "random test images")
    entries = result.manifest["artifacts"]
    assert entries["onnx_fp32"]["status"] == "failed" and "min_agreement" in entries["onnx_fp32"]["reason"]
    assert entries["onnx_fp32"]["parity"]["agreement"] < 0.5  # really wrong, measured
    assert entries["packed"]["status"] == "written" and entries["packed"]["parity"]["agreement"] == 1.0
    assert entries["onnx_int8"]["status"] == "skipped" and entries["torchscript_int8"]["reason"].startswith("not selected")
    assert result.failed() == ["onnx_fp32"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "weights.lcpk"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == result.manifest
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


@pytest.mark.parametrize("values", ["fp16", "int8"])
def test_packed_artifact_computes_what_the_network_computes(tmp_path, values):
    net = trained_toy(zoo=True)
    images = random_images(128, seed=1).tensors[0]
    export_artifacts(net, META, tmp_path / "out", images, only=["packed"], values=values)
    artifact = load_artifact(tmp_path / "out")
    assert artifact.kind == "packed"
    with torch.no_grad():
        result = parity(net(images), artifact.logits(images), tolerance=0.0)
    assert result.top1_agreement >= 0.98 and result.max_logit_error < (0.01 if values == "fp16" else 0.05)


def test_qat_checkpoint_exports_the_int8_qdq_model(tmp_path):
    from lightning_compress.commands.checkpoint import load_checkpoint
    from lightning_compress.quantization.prepare import frozen_copy

    # fake-quantized from step 20: from step 0, 40 steps of resnet20 collapse to one class (nothing to compare)
    qat = QuantizationAwareTraining(start="20steps", convert_on_fit_end=False, engine="x86")  # x86: TorchScript too
    ckpt = write_checkpoint(tmp_path, callbacks=[qat], steps=40)
    loaded = load_checkpoint(ckpt)
    assert loaded.metadata["quantization"] == {"engine": "x86"}
    images, labels = random_images(128, seed=1).tensors
    result = export_artifacts(loaded.network, loaded.metadata, tmp_path / "out", images, labels, "test images",
                              only=["packed", "onnx_fp32", "onnx_int8", "torchscript_int8"])
    entries = result.manifest["artifacts"]
    assert entries["onnx_fp32"]["status"] == "skipped"  # a QAT network deploys as int8
    assert {entries[k]["status"] for k in ("packed", "onnx_int8", "torchscript_int8")} == {"written"}
    int8 = entries["onnx_int8"]["parity"]
    assert int8["agreement"] >= 0.95 and int8["accuracy"] is not None
    artifact = load_artifact(tmp_path / "out")
    assert artifact.kind == "onnx" and artifact.path.name == "model_int8.onnx"
    with torch.no_grad():
        expected = frozen_copy(loaded.network)(images)
    assert len(set(expected.argmax(1).tolist())) >= 2  # the check is not agreement on one constant class
    assert parity(expected, artifact.logits(images)).agreement >= 0.95
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["metadata"]["classes"] == ["0", "1", "2", "3"]


def test_report_times_the_onnx_model_of_an_onnxruntime_checkpoint(tmp_path, monkeypatch):
    from lightning_compress.cli import main

    qat = QuantizationAwareTraining(engine="onnxruntime", start="2steps", convert_on_fit_end=False)
    ckpt = write_checkpoint(tmp_path, callbacks=[qat], steps=4)
    batches = []
    run = OnnxRuntimeNetwork.forward
    monkeypatch.setattr(OnnxRuntimeNetwork, "forward", lambda self, x: batches.append(len(x)) or run(self, x))
    main(["report", str(ckpt), "--out", str(tmp_path / "report"), "--latency-repeats", "1", "--batch-sizes", "3"])
    summary = json.loads((tmp_path / "report" / "compression_report.json").read_text())
    assert summary["latency"]["compressed_model"] == "int8" and summary["latency"]["batches"]["3"]["compressed_ms"] > 0
    assert 3 in batches  # the timed int8 model is the QDQ ONNX file in onnxruntime, not torch's int8


def test_check_sample_keeps_every_class_share_and_its_seed():
    from lightning_compress.export.sample import stratified_sample

    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)  # sorted by class, unequal classes
    sample = stratified_sample(labels, 100, seed=0, names=["cat", "dog", "owl"])
    assert sample.per_group == {"cat": 50, "dog": 30, "owl": 20}
    assert torch.bincount(labels[sample.indices]).tolist() == [50, 30, 20]
    assert len(set(sample.indices.tolist())) == 100 and torch.equal(sample.indices, sample.indices.sort().values)
    assert torch.equal(stratified_sample(labels, 100, seed=0).indices, sample.indices)  # seeded
    assert not torch.equal(stratified_sample(labels, 100, seed=1).indices, sample.indices)
    assert stratified_sample(labels, 7).per_group == {"0": 4, "1": 2, "2": 1}  # largest remainder: 3.5, 2.1, 1.4
    everything = stratified_sample(labels, None)
    assert everything.method == "all" and len(everything.indices) == 1000 and everything.to_dict()["seed"] is None
    assert stratified_sample(labels, 5000).method == "all"
    with pytest.raises(ValueError, match="count must be >= 1"):
        stratified_sample(labels, 0)
