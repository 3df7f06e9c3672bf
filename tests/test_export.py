"""Packed weights restore exactly; exports are all-or-nothing; ONNX agrees with torch; QAT -> int8 files."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_compress.export import (
    build_network,
    export_artifacts,
    int8_weight_quantization,
    load_artifact,
    onnx_agreement,
    onnx_bytes,
    pack_state_dict,
    read_packed,
    unpack_state_dict,
    write_packed,
)
from lightning_compress.quantization import QuantizationAwareTraining
from tests.test_commands import write_checkpoint
from tests.toy import ToyConvNet

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


def test_onnx_export_agrees_with_torch():
    net = ToyConvNet().eval()
    images = torch.randn(64, 3, 16, 16)
    assert onnx_agreement(onnx_bytes(net, images[:1], META), net, images) >= 0.99


def test_export_is_all_or_nothing(tmp_path, monkeypatch):
    import lightning_compress.export as export

    net = build_network(META)
    monkeypatch.setattr(export, "onnx_agreement", lambda *a: 0.5)
    with pytest.raises(RuntimeError, match="agrees with the torch model on only 50.0%"):
        export_artifacts(net, META, tmp_path / "out", torch.randn(8, 3, 16, 16))
    assert list(tmp_path.iterdir()) == []


def test_qat_checkpoint_exports_an_int8_model_and_int8_onnx(tmp_path):
    ckpt = write_checkpoint(tmp_path, callbacks=[QuantizationAwareTraining(convert_on_fit_end=False)])
    from lightning_compress.commands.checkpoint import load_checkpoint
    from lightning_compress.export import int8_from_qat

    loaded = load_checkpoint(ckpt)
    assert loaded.metadata["quantization"] == {"engine": "x86"}
    images = torch.randn(32, 3, 16, 16)
    int8 = int8_from_qat(loaded.network, "x86")
    result = export_artifacts(loaded.network, loaded.metadata, tmp_path / "out", images, int8_network=int8)
    files = result.manifest["files"]
    assert "int8" in files and "onnx_fp32" not in files
    if "onnx_int8" in files:
        assert result.manifest["checks"]["onnx_int8_top1_agreement"] >= 0.99
    else:  # the exporter's limits are reported, not hidden
        assert "onnx_int8" in result.manifest["skipped"]
    artifact = load_artifact(tmp_path / "out")
    assert artifact.kind == "int8"
    assert torch.equal(artifact.logits(images).argmax(1), int8(images).argmax(1))
    packed = load_artifact(tmp_path / "out" / "weights.lcpk")  # QAT state: rebuilt, prepared, restored
    assert packed.logits(images).shape == (32, 4)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["metadata"]["classes"] == ["0", "1", "2", "3"]
