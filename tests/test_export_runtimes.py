"""One export, several runtimes: onnxruntime and OpenVINO run the same ONNX file, AOTInductor a .pt2 package; each
is checked in its own runtime and timed; a runtime that cannot take the checkpoint is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_compress.cli import main
from lightning_compress.commands.checkpoint import load_checkpoint
from lightning_compress.core.comparison import parity
from lightning_compress.core.onnx import MissingExtraError, OnnxRuntimeNetwork
from lightning_compress.export import export_artifacts, load_artifact
from lightning_compress.export.openvino import OpenVinoNetwork
from lightning_compress.export.runtimes import RUNTIME_TABLE, Runtime, select_artifacts
from lightning_compress.quantization import QuantizationAwareTraining
from tests.test_commands import write_checkpoint
from tests.toy import random_images

IMAGES, LABELS = random_images(128, seed=1).tensors


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("fp32"), steps=40)


@pytest.fixture(scope="module")
def qat_checkpoint(tmp_path_factory) -> Path:
    qat = QuantizationAwareTraining(engine="onnxruntime", start="20steps", convert_on_fit_end=False)
    return write_checkpoint(tmp_path_factory.mktemp("qat"), callbacks=[qat], steps=40)


def _export(checkpoint: Path, out: Path, runtimes=None):
    loaded = load_checkpoint(checkpoint)
    engine = (loaded.metadata.get("quantization") or {}).get("engine")
    return export_artifacts(loaded.network, loaded.metadata, out, IMAGES, LABELS, "random test images",
                            only=select_artifacts(runtimes, engine), latency_repeats=3)


def test_default_runtimes_follow_the_checkpoint_and_what_is_installed(monkeypatch):
    assert select_artifacts(None, None) == ("packed", "onnx_fp32", "onnx_int8", "openvino")
    assert select_artifacts(None, "x86") == ("packed", "onnx_fp32", "onnx_int8", "openvino")
    assert select_artifacts(None, "x86_inductor") == ("packed", "aoti")
    assert select_artifacts(None, "xnnpack") == ("packed", "executorch")
    assert select_artifacts(["aoti"], None) == ("packed", "aoti")  # fp32 packages only when asked: slow to build
    monkeypatch.setitem(RUNTIME_TABLE, "openvino", Runtime("openvino", ("openvino",), (), ("no_such_package",),
                                                           "pip install 'lightning-compress[openvino]'"))
    assert select_artifacts(None, None) == ("packed", "onnx_fp32", "onnx_int8")  # not installed: not by default
    with pytest.raises(MissingExtraError, match=r"runtime 'openvino' needs no_such_package.*\[openvino\]"):
        select_artifacts(["openvino"], None)
    monkeypatch.undo()
    monkeypatch.setattr(Runtime, "installed", lambda self: False)
    with pytest.raises(MissingExtraError, match=r"none of the runtimes for this checkpoint \(onnxruntime, openvino\) "
                                                r"is installed: pip install 'lightning-compress\[export\]'"):
        select_artifacts(None, None)


def test_fp32_checkpoint_ships_one_onnx_file_checked_and_timed_in_onnxruntime_and_openvino(fp32_checkpoint, tmp_path):
    result = _export(fp32_checkpoint, tmp_path / "out")
    entries = result.manifest["artifacts"]
    assert entries["onnx_fp32"]["status"] == entries["openvino"]["status"] == "written"
    assert entries["openvino"]["file"] == "model_fp32.onnx"  # the same file, no copy
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model_fp32.onnx", "weights.lcpk"]
    assert entries["openvino"]["parity"]["top1_agreement"] >= 0.99
    assert entries["aoti"]["status"] == "skipped" and "not selected" in entries["aoti"]["reason"]
    latency = result.manifest["latency"]
    assert set(latency["median_ms"]) == {"onnx_fp32", "openvino"} and min(latency["median_ms"].values()) > 0
    fastest = min(latency["median_ms"], key=latency["median_ms"].get)
    assert latency["fastest"] == {"artifact": fastest, "runtime": {"onnx_fp32": "onnxruntime"}.get(fastest, fastest)}
    assert latency["threads"] == 1 and latency["cpu"]["model"]


def test_qat_checkpoint_for_openvino_alone_writes_the_qdq_file_openvino_agrees_with(qat_checkpoint, tmp_path):
    result = _export(qat_checkpoint, tmp_path / "out", ["openvino"])
    entries = result.manifest["artifacts"]
    assert entries["onnx_int8"]["status"] == "skipped" and entries["openvino"]["status"] == "written"
    assert entries["openvino"]["parity"]["agreement"] >= 0.95
    blob = (tmp_path / "out" / "model_int8.onnx").read_bytes()
    with torch.no_grad():
        in_openvino, in_onnxruntime = OpenVinoNetwork(blob, threads=1)(IMAGES), OnnxRuntimeNetwork(blob, 1)(IMAGES)
    assert len(set(in_onnxruntime.argmax(1).tolist())) >= 2  # not agreement on one constant class
    assert parity(in_onnxruntime, in_openvino, tolerance=0.0).top1_agreement >= 0.99
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["latency"]["fastest"]["runtime"] == "openvino"


@pytest.mark.parametrize(("runtime", "expected"), [
    ("aoti", ("runtime 'aoti' cannot run an int8 checkpoint of engine 'onnxruntime'; train with "
              "engine='x86_inductor', or export with --runtime onnxruntime openvino")),
    ("torch", ("runtime 'torch' cannot run an int8 checkpoint of engine 'onnxruntime'; train with engine='x86' or "
               "engine='onednn' or engine='qnnpack'")),
])
def test_a_runtime_that_cannot_take_the_checkpoint_is_refused_in_one_line(qat_checkpoint, tmp_path, capsys,
                                                                           runtime, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(qat_checkpoint), "--to", str(tmp_path / "out"), "--runtime", runtime])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_fp32_checkpoint_is_refused_by_an_int8_only_runtime(fp32_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(fp32_checkpoint), "--to", str(tmp_path / "out"), "--runtime", "torch"])
    assert exit_info.value.code == 2
    assert "runtime 'torch' runs int8 models only; export this fp32 checkpoint with --runtime onnxruntime openvino " \
           "aoti" in capsys.readouterr().err


def test_export_command_prints_each_runtime_and_the_fastest(fp32_checkpoint, tmp_path, capsys):
    main(["export", str(fp32_checkpoint), "--to", str(tmp_path / "out"), "--latency-repeats", "2",
          "--check-count", "64"])
    out = capsys.readouterr().out
    assert "openvino: written" in out and "model_fp32.onnx" in out
    assert "batch 1, 1 thread" in out and "fastest: " in out


def readme_deploy_snippet() -> str:
    """The README's "Deploy" code: the python block after its ``deploy-snippet`` marker."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text[text.index("<!-- deploy-snippet -->"):]
    code = block[block.index("```python\n") + len("```python\n"):]
    return code[:code.index("```")]


@pytest.mark.slow  # AOTInductor compiles C++: about a minute on 2 busy cores
def test_pt2e_checkpoint_ships_an_aoti_package_that_computes_what_it_was_checked_for(tmp_path, qat_checkpoint,
                                                                                      monkeypatch):
    qat = QuantizationAwareTraining(engine="x86_inductor", start="20steps", convert_on_fit_end=False)
    checkpoint = write_checkpoint(tmp_path, callbacks=[qat], steps=40)
    result = _export(checkpoint, tmp_path / "out")
    entries = result.manifest["artifacts"]
    assert entries["aoti"]["status"] == "written" and entries["aoti"]["parity"]["agreement"] >= 0.95
    assert entries["packed"]["status"] == "skipped" and "(aoti)" in entries["packed"]["reason"]
    assert {entries[k]["status"] for k in ("onnx_int8", "openvino")} == {"skipped"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.pt2"]
    artifact = load_artifact(tmp_path / "out")
    assert artifact.kind == "aoti" and artifact.metadata["classes"] == ["0", "1", "2", "3"]
    reference = load_checkpoint(checkpoint)
    with torch.no_grad():
        from lightning_compress.quantization import pt2e

        int8 = pt2e.convert(reference.network)(IMAGES)
        shipped = artifact.logits(IMAGES)
    assert len(set(int8.argmax(1).tolist())) >= 2
    assert parity(int8, shipped).top1_agreement >= 0.99  # the checkpoint's in-process int8 graph
    assert tuple(artifact.logits(IMAGES[:1]).shape) == (1, 4)  # batch size stays dynamic
    assert result.manifest["latency"]["fastest"] == {"artifact": "aoti", "runtime": "aoti"}

    main(["report", str(checkpoint), "--out", str(tmp_path / "report"), "--latency-repeats", "1", "--batch-sizes",
          "2", "--runtime"])  # a PT2E checkpoint's int8 graph is timed in torch
    summary = json.loads((tmp_path / "report" / "compression_report.json").read_text())
    assert summary["latency"]["compressed_model"] == "int8" and summary["latency"]["batches"]["2"]["compressed_ms"] > 0

    # the README's lines run each runtime's file: model.pt2 beside an onnxruntime checkpoint's model_int8.onnx
    _export(qat_checkpoint, tmp_path / "onnx", ["onnxruntime"])
    (tmp_path / "out" / "model_int8.onnx").write_bytes((tmp_path / "onnx" / "model_int8.onnx").read_bytes())
    (tmp_path / "out").rename(tmp_path / "export")
    from lightning_compress.export.executorch import pte_bytes
    from lightning_compress.models import create_model

    fp32 = create_model("resnet20", num_classes=4).eval()  # any .pte: the snippet's lines are what is tested
    (tmp_path / "export" / "model.pte").write_bytes(pte_bytes(fp32, IMAGES[:2]))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(readme_deploy_snippet().replace("32, 32", "16, 16"), scope)  # these checkpoints take 16x16 images
    assert tuple(scope["logits"].shape) == (4, 4) and scope["compiled"] is not None and scope["session"] is not None
    assert scope["runner"] is not None and scope["method"] is not None


def test_report_names_the_fastest_runtime_of_the_checkpoint(fp32_checkpoint, qat_checkpoint, tmp_path, capsys):
    main(["report", str(fp32_checkpoint), "--out", str(tmp_path / "r"), "--latency-repeats", "2", "--batch-sizes",
          "1", "--runtime", "onnxruntime", "openvino"])
    runtimes = json.loads((tmp_path / "r" / "compression_report.json").read_text())["runtimes"]
    assert set(runtimes["median_ms"]) == {"onnx_fp32", "openvino"}
    assert runtimes["fastest"]["runtime"] in ("onnxruntime", "openvino") and runtimes["cpu"]["model"]
    assert f"fastest runtime **{runtimes['fastest']['runtime']}**" in capsys.readouterr().out
    main(["report", str(fp32_checkpoint), "--out", str(tmp_path / "none"), "--latency-repeats", "1",
          "--batch-sizes", "--runtime"])
    assert "runtimes" not in json.loads((tmp_path / "none" / "compression_report.json").read_text())
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(qat_checkpoint), "--out", str(tmp_path / "bad"), "--runtime", "aoti"])
    assert exit_info.value.code == 2 and "train with engine='x86_inductor'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # ExecuTorch lowers and serializes the graph: half a minute on 2 busy cores
def test_xnnpack_checkpoint_ships_an_executorch_program_that_computes_the_int8_graph(tmp_path, capsys):
    from lightning_compress.quantization import pt2e

    qat = QuantizationAwareTraining(engine="xnnpack", start="20steps", convert_on_fit_end=False)
    checkpoint = write_checkpoint(tmp_path, callbacks=[qat], steps=40)
    result = _export(checkpoint, tmp_path / "out")
    entries = result.manifest["artifacts"]
    assert entries["executorch"]["status"] == "written" and entries["executorch"]["parity"]["agreement"] >= 0.95
    assert {entries[k]["status"] for k in ("packed", "onnx_int8", "openvino", "aoti")} == {"skipped"}
    assert "(executorch)" in entries["packed"]["reason"] and "not selected" in entries["aoti"]["reason"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.pte"]
    artifact = load_artifact(tmp_path / "out")
    assert artifact.kind == "executorch"
    with torch.no_grad():
        int8 = pt2e.convert(load_checkpoint(checkpoint).network)(IMAGES)
        shipped = artifact.logits(IMAGES)
    assert len(set(int8.argmax(1).tolist())) >= 2
    assert parity(int8, shipped).top1_agreement >= 0.99  # the checkpoint's in-process int8 graph
    assert tuple(artifact.logits(IMAGES[:1]).shape) == (1, 4)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), "--to", str(tmp_path / "bad"), "--runtime", "aoti"])
    assert exit_info.value.code == 2
    assert "cannot run an int8 checkpoint of engine 'xnnpack'; train with engine='x86_inductor', or export with " \
           "--runtime executorch" in capsys.readouterr().err
