"""The report / export / predict / sensitivity commands on real checkpoints written by a real Trainer."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from PIL import Image

from lightning_compress.cli import main
from lightning_compress.commands import is_command
from lightning_compress.module import ImageClassifier
from lightning_compress.pruning import MagnitudePruning
from tests.test_cli import write_image_folder
from tests.toy import random_loader


def trainer(tmp_path: Path, callbacks=(), logger=False, steps: int = 2) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=logger, callbacks=list(callbacks),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, limit_val_batches=1, num_sanity_val_steps=0)


def write_checkpoint(tmp_path: Path, sparsity: float = 0.0, callbacks=(), num_classes: int = 4, steps: int = 2) -> Path:
    """Fit resnet20 ``steps`` steps on 16x16 learnable random images, zero the smallest weights, save a real
    checkpoint (at 40 steps its predictions vary with the input)."""
    model = ImageClassifier("resnet20", num_classes=num_classes, lr=0.05)
    fit = trainer(tmp_path, callbacks, steps=steps)
    fit.fit(model, random_loader(256, batch_size=16, shuffle=True, num_classes=num_classes),
            random_loader(16, batch_size=16, num_classes=num_classes))
    if sparsity:
        with torch.no_grad():
            for name, p in model.model.named_parameters():
                if p.dim() == 4 and name != "conv1.weight":
                    p.mul_(p.abs() > p.abs().flatten().kthvalue(int(sparsity * p.numel())).values)
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), sparsity=0.5, steps=40)


def test_dispatch_keeps_lightningcli_predict():
    assert is_command(["report", "x.ckpt"]) and is_command(["predict", "--model=m.onnx", "a.png"])
    assert not is_command(["predict", "--config", "recipe.yaml"]) and not is_command(["fit"])


def test_report_command_writes_markdown_and_json(checkpoint, tmp_path, capsys):
    main(["report", str(checkpoint), "--out", str(tmp_path), "--latency-repeats", "1", "--batch-sizes", "1"])
    summary = json.loads((tmp_path / "compression_report.json").read_text())
    assert summary["sizes"]["checkpoint_bytes"] == checkpoint.stat().st_size
    assert summary["sizes"]["ratio"] > 3  # 50 % sparse body convs, int8 values
    assert 0.4 < summary["totals"]["layer_sparsity"] < 0.55
    assert "compression ratio" in capsys.readouterr().out
    assert (tmp_path / "compression_report.png").stat().st_size > 0


def write_check_images(folder: Path, n: int = 24) -> list[Path]:
    """Images whose red level spans the range the models learned the classes from."""
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.png"
        Image.new("RGB", (16, 16), (int(255 * i / (n - 1)), 100 + i, 128)).save(path)
        paths.append(path)
    return paths


def test_export_then_predict(checkpoint, tmp_path, capsys):
    from lightning_compress.commands.checkpoint import load_checkpoint
    from lightning_compress.commands.predict import read_image

    out = tmp_path / "export"
    images = write_check_images(tmp_path / "check")
    main(["export", str(checkpoint), "--to", str(out), "--classes", "a,b,c,d", "--check-images", str(tmp_path / "check")])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"] == {**manifest["check"], "images": 24, "labels": False}
    # by default every installed runtime that takes the checkpoint: onnxruntime and OpenVINO read the same file
    assert {name for name, e in manifest["artifacts"].items() if e["status"] == "written"} == {
        "packed", "onnx_fp32", "openvino"}
    assert manifest["artifacts"]["onnx_int8"]["status"] == "skipped"
    assert manifest["artifacts"]["onnx_fp32"]["parity"]["top1_agreement"] == 1.0
    assert not list(tmp_path.glob(".export*")), "temporary directory left behind"

    loaded = load_checkpoint(checkpoint, classes=list("abcd"))
    meta = loaded.metadata
    with torch.no_grad():
        expected = loaded.network(torch.stack([read_image(p, meta["input_size"], meta["mean"], meta["std"])
                                               for p in images])).argmax(1)
    assert len(set(expected.tolist())) >= 2, "the check must not be agreement on one constant class"
    capsys.readouterr()
    for model in (out, out / "weights.lcpk", out / "model_fp32.onnx"):
        main(["predict", "--model", str(model), *map(str, images), "--top-k", "1"])
        predicted = [line.split(": ")[1].split()[0] for line in capsys.readouterr().out.splitlines()]
        assert predicted == ["abcd"[i] for i in expected.tolist()]  # the artifact classifies as the network does

    Image.new("RGB", (50, 70), (200, 10, 10)).save(tmp_path / "big.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", str(out), str(tmp_path / "big.png"), str(tmp_path / "broken.png"), "--top-k", "2"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    probs = [float(part.split()[1]) for part in captured.out.splitlines()[0].split(": ")[1].split(", ")]
    assert len(probs) == 2 and probs[0] >= probs[1] and 0 < sum(probs) <= 1.0001
    assert "broken.png" in captured.err and "1 of 2 images" in captured.err


def test_export_only_and_a_missing_extra(checkpoint, tmp_path, capsys, monkeypatch):
    main(["export", str(checkpoint), "--to", str(tmp_path / "packed"), "--only", "packed"])
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["manifest.json", "weights.lcpk"]
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the [export] extra were not installed
    for argv in (["export", str(checkpoint), "--to", str(tmp_path / "onnx")],
                 ["predict", "--model", str(tmp_path / "model.onnx"), "x.png"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "pip install 'lightning-compress[export]'" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_export_refuses_a_non_empty_directory_without_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), "--to", str(out)])
    assert exit_info.value.code == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    main(["export", str(checkpoint), "--to", str(out), "--overwrite", "--values", "fp16"])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model_fp32.onnx", "weights.lcpk"]


@pytest.mark.parametrize("command", [["report"], ["export", "--to", "OUT"], ["sensitivity", "--data-root", "ROOT"]])
def test_every_command_turns_a_bad_checkpoint_into_one_line_and_exit_2(tmp_path, capsys, command):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"garbage")
    argv = [part.replace("OUT", str(tmp_path / "out")).replace("ROOT", str(tmp_path)) for part in command]
    with pytest.raises(SystemExit) as exit_info:
        main([argv[0], str(path), *argv[1:]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "not a readable checkpoint" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    (b"garbage", "not a readable checkpoint"),
    ("plain_state_dict", "not a Lightning checkpoint"),
])
def test_bad_checkpoints_give_clear_errors(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.ckpt"
    if content == "plain_state_dict":
        torch.save({"weight": torch.zeros(2)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and "bad.ckpt" in err


def test_foreign_lightning_checkpoint_says_what_was_expected(tmp_path, capsys):
    from tests.toy import UserClassifier

    fit = trainer(tmp_path)
    fit.fit(UserClassifier(), random_loader(16))
    fit.save_checkpoint(tmp_path / "user.ckpt")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "user.ckpt"), "--to", str(tmp_path / "out")])
    assert "was not written by ImageClassifier" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sensitivity_targets_are_accepted_by_magnitude_pruning(tmp_path):
    write_image_folder(tmp_path / "tree", classes=10, per_class=3)
    ckpt = write_checkpoint(tmp_path, num_classes=10)
    main(["sensitivity", str(ckpt), "--data-root", str(tmp_path / "tree"), "--cache-dir", str(tmp_path / "cache"),
          "--val-size", "8", "--batch-size", "8", "--batches", "1", "--sparsities", "0.5", "0.9",
          "--include", "model.layer3.*", "--out", str(tmp_path / "sens")])
    rows = (tmp_path / "sens" / "sensitivity.csv").read_text().splitlines()
    assert rows[0] == "layer,sparsity,accuracy,drop" and len(rows) == 1 + 7 * 3  # 7 convs x (dense, 0.5, 0.9)
    assert (tmp_path / "sens" / "sensitivity.png").stat().st_size > 0
    arguments = yaml.safe_load((tmp_path / "sens" / "pruning_targets.yaml").read_text())
    assert len(arguments["final_sparsity"]) == 7
    assert all(v in (0.0, 0.5, 0.9) for v in arguments["final_sparsity"].values())
    pruning = MagnitudePruning(**arguments, schedule="constant", end=1.0)
    model = ImageClassifier("resnet20", num_classes=10)
    run = trainer(tmp_path, [pruning], steps=1)
    run.fit(model, random_loader(16, batch_size=16, num_classes=10))
    for layer, target in arguments["final_sparsity"].items():
        weight = model.get_submodule(layer).weight
        assert float((weight == 0).float().mean()) == pytest.approx(target, abs=0.01)


class _Payload:
    """Pickles to a call of ``os.system``: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def write_payload_checkpoint(checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A real ImageClassifier checkpoint with a code payload in its hyper_parameters."""
    marker = tmp_path / "payload_ran"
    data = torch.load(checkpoint, map_location="cpu", weights_only=False)
    data["hyper_parameters"]["notes"] = _Payload(marker)
    path = tmp_path / "payload.ckpt"
    torch.save(data, path)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("command", [["report"], ["export", "--to", "OUT"], ["sensitivity", "--data-root", "ROOT"]])
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(checkpoint, tmp_path, capsys, command):
    path, marker = write_payload_checkpoint(checkpoint, tmp_path)
    argv = [part.replace("OUT", str(tmp_path / "out")).replace("ROOT", str(tmp_path)) for part in command]
    with pytest.raises(SystemExit) as exit_info:
        main([argv[0], str(path), *argv[1:]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "payload.ckpt" in err and "posix.system" in err and "not data" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_teacher_and_load_from_checkpoint_refuse_the_payload_too(checkpoint, tmp_path, monkeypatch):
    from lightning_compress import KnowledgeDistillation

    path, marker = write_payload_checkpoint(checkpoint, tmp_path)
    with monkeypatch.context() as env:  # the teacher is read as data even where torch's default is switched off
        env.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        with pytest.raises(ValueError, match="cannot rebuild the teacher"):
            KnowledgeDistillation(teacher=str(path))
    with pytest.raises(ValueError, match="cannot rebuild the teacher"):
        KnowledgeDistillation(teacher=str(path))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # torch's weights_only default
        ImageClassifier.load_from_checkpoint(path)
    assert not marker.exists()


def test_export_checks_a_sample_of_every_class_of_a_class_sorted_split(checkpoint, tmp_path, capsys):
    tree = tmp_path / "tree"
    write_image_folder(tree, classes=10, per_class=4)  # the test split is stored class by class
    out, common = tmp_path / "export", ["--only", "packed", "--cache-dir", str(tmp_path / "cache")]
    main(["export", str(checkpoint), "--to", str(out), "--data-root", str(tree), "--check-count", "20", *common])
    check = json.loads((out / "manifest.json").read_text())["check"]
    assert check["images"] == 20  # the first 20 would be five classes
    assert check["sample"] == {"method": "stratified", "seed": 0, "size": 20, "population": 40,
                               "per_class": {f"class{c}": 2 for c in range(10)}}
    assert "(stratified, seed 0: 2-2 per class)" in capsys.readouterr().out

    main(["export", str(checkpoint), "--to", str(out), "--overwrite", "--data-root", str(tree), "--check-count", "all",
          *common])
    sample = json.loads((out / "manifest.json").read_text())["check"]["sample"]
    assert sample["method"] == "all" and sample["size"] == 40 and set(sample["per_class"].values()) == {4}

    main(["export", str(checkpoint), "--to", str(out), "--overwrite", "--check-images", str(tree / "test"),
          "--check-count", "10", "--check-seed", "3", *common])
    sample = json.loads((out / "manifest.json").read_text())["check"]["sample"]
    assert sample["seed"] == 3 and sample["per_folder"] == {f"class{c}": 1 for c in range(10)}


@pytest.mark.parametrize("value", ["0", "some"])
def test_export_refuses_a_bad_check_count(checkpoint, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), "--to", str(tmp_path / "out"), "--check-count", value])
    assert exit_info.value.code == 2 and "'all'" in capsys.readouterr().err
