"""The benchmark suite (``benchmarks/suite.py``) and the GPU script (``benchmarks/device.sh``) at the smoke budget.

The suite runs as the README runs it (its own process) on a tiny generated JPEG archive in the layout of
the shared CIFAR-10 copy, writing into ``tmp_path``; the checks read the JSON lines and the RESULTS.md it
wrote: the measured values of a ResNet-20 (parameters, MACs, non-zeros after pruning, int8 artifact
smaller than fp32, latencies), not only that files exist. ``device.sh --dry-run`` runs the GPU script's
whole sequence on the CPU. Unit tests cover budgets, code versions, the skip-on-rerun rule and the
report's target lines in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.cifar_fakes import write_image_tree, write_tarball

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESNET20_PARAMS = 272_474
RESNET20_MACS = 40_813_184  # per 32x32 image, convolutions and the classifier
TIMEOUT_S = 300

sys.path.insert(0, str(BENCHMARKS))
import suite  # (benchmarks/ is not a package: imported from its folder, as the scripts import each other)
import suite_report
import suite_rows


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_image_tree(root / "tree", n_train=4, n_test=2, fmt="jpg")
    return write_tarball(root / "tree", root / "cifar10-jpeg.tar.gz")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LIGHTNING_COMPRESS_CACHE": str(tmp_path / "cache")}


def _records(path: Path) -> dict[str, dict]:
    return {r["row"]: r for r in map(json.loads, path.read_text().splitlines())}


def _check_measured_rows(rows: dict[str, dict], markdown: str) -> None:
    dense = rows["dense"]
    assert dense["status"] == "ok" and 0.0 <= dense["top1"] <= 100.0
    assert dense["params"] == dense["nonzero"] == RESNET20_PARAMS
    assert dense["macs"] == RESNET20_MACS
    assert dense["artifact"]["kind"] == "onnx fp32" and dense["artifact"]["bytes"] > 4 * RESNET20_PARAMS
    assert dense["latency_ms"]["ort_fp32"] > 0 and dense["wall_s"] >= dense["fit_s"] > 0
    assert dense["config"]["budget"]["name"] == "smoke" and len(dense["code_version"]) == 12
    assert dense["machine"]["cpu"]["model"]
    qat = rows["qat"]
    assert qat["status"] == "ok" and qat["artifact"]["kind"] in ("onnx int8 (QDQ)", "onnx int8", "torchscript int8")
    assert qat["artifact"]["bytes"] < dense["artifact"]["bytes"] / 2  # int8 weights: about a quarter
    assert set(qat["latency_ms"]) & {"ort_int8", "torchscript_int8"}
    assert f"| dense | The dense ResNet-20: the reference of every row | {dense['top1']:.2f} | - | 272,474 | " \
           "272,474 | 40.8 | onnx fp32 " in markdown
    assert "## Budget: smoke" in markdown and "Targets (" in markdown and "- QAT int8: " in markdown


def test_suite_smoke_rows(tmp_path: Path, cifar_archive: Path) -> None:
    out = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, "benchmarks/suite.py", "--budget", "smoke", "--only", "dense,gmp90,qat,lowrank",
         "--data", str(cifar_archive), "--results-dir", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=BENCHMARKS.parent, env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = _records(out / "suite_smoke.jsonl")
    markdown = (out / "RESULTS.md").read_text()
    _check_measured_rows(rows, markdown)
    gmp = rows["gmp90"]
    assert gmp["params"] == RESNET20_PARAMS and gmp["nonzero"] < 0.2 * RESNET20_PARAMS  # stem/classifier kept
    assert gmp["packed_bytes"] < rows["dense"]["packed_bytes"] / 3
    lowrank = rows["lowrank"]
    assert lowrank["status"] in ("ok", "skipped")
    if lowrank["status"] == "skipped":
        assert lowrank["reason"].startswith("not available in this code version")
        assert "| lowrank | " in markdown and "skipped: not available in this code version" in markdown
    assert (out / "suite.png").stat().st_size > 10_000


def test_recorded_row_is_kept_and_changed_code_is_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    budget, _ = suite_rows.resolve_budget("smoke")
    runner = suite.Suite(budget, "test", "data.tar.gz", tmp_path, tmp_path / "work")
    record = {"row": "dense", "config": runner.config("dense"), "code_version": suite.code_version(()),
              "status": "ok", "top1": 12.5}
    runner.jsonl.write_text(json.dumps(record) + "\n")
    assert runner.run_row("dense") == record  # same config and code: kept, nothing trained
    assert runner._is_recorded("gmp90") is None  # another row
    other = suite.Suite(budget, "test", "other.tar.gz", tmp_path, tmp_path / "work")
    assert other._is_recorded("dense") is None  # other data: another config
    monkeypatch.setattr(suite, "code_version", lambda sources: "0" * 12)
    assert runner._is_recorded("dense") is None  # changed code: measured again


def test_code_version_follows_the_row_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("module.py", "pruning/magnitude.py", "quantization/qat.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    monkeypatch.setattr(suite_rows, "PACKAGE", tmp_path)
    version = suite_rows.code_version
    pruning, quantization = version(("pruning",)), version(("quantization",))
    (tmp_path / "quantization/qat.py").write_text("x = 2\n")
    assert version(("pruning",)) == pruning
    assert version(("quantization",)) != quantization
    (tmp_path / "module.py").write_text("x = 3\n")  # a base source: every row changes
    assert version(("pruning",)) != pruning


def test_budgets_follow_the_cpu() -> None:
    with_bf16, _ = suite_rows.resolve_budget("cpu", {"model": "x", "flags": ["avx512_bf16"], "bf16": True})
    without, reason = suite_rows.resolve_budget("cpu", {"model": "x", "flags": ["avx2"], "bf16": False})
    assert (with_bf16.precision, with_bf16.epochs) == ("bf16-mixed", 10)
    assert (without.precision, without.epochs) == ("32-true", 5) and "no native bf16" in reason
    gpu, _ = suite_rows.resolve_budget("gpu")
    assert gpu.accelerator == "gpu" and gpu.data_on_device
    with pytest.raises(ValueError, match="budget must be one of smoke, cpu, gpu, got 'tpu'"):
        suite_rows.resolve_budget("tpu")


def test_device_batches_cover_the_split_once_per_epoch() -> None:
    import torch

    images, labels = torch.arange(10).view(10, 1).expand(10, 3), torch.arange(10)
    batches = list(suite.DeviceBatches(images, labels, batch_size=4, shuffle=True, with_indices=True))
    assert len(batches) == len(suite.DeviceBatches(images, labels, 4, True)) == 3
    seen = torch.cat([index for _, _, index in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert all(torch.equal(x[:, 0], y) and torch.equal(y, i) for x, y, i in batches)


def _ok(row: str, top1: float, **extra) -> dict:
    return {"row": row, "status": "ok", "top1": top1, **extra}


def test_targets_say_met_or_not() -> None:
    dense = _ok("dense", 80.0, artifact={"bytes": 1_000_000}, latency_ms={"ort_fp32": 1.0})
    ok = {"dense": dense, "gmp90": _ok("gmp90", 77.5), "qat": _ok("qat", 79.8), "kd": _ok("kd", 79.0),
          "pipeline": _ok("pipeline", 78.0, artifact={"bytes": 90_000}, packed_bytes=50_000,
                          latency_ms={"ort_int8": 0.3})}
    lines = "\n".join(suite_report.targets(ok))
    assert "- GMP 90 %: +2.50 points below dense (limit 2.0): NOT met" in lines
    assert "- QAT int8: +0.20 points below dense (limit 0.3): met" in lines
    assert "- channel pruning, half the MACs: not measured" in lines
    assert "- kd vs student alone: -1.00 points: NOT met" in lines
    assert "- full pipeline: deployed artifact 11.1x smaller than dense's fp32 ONNX (packed weights 20.0x), " \
           "int8 3.33x faster" in lines and lines.endswith("+2.00 points below dense: met")


@pytest.mark.slow
def test_device_sh_dry_run(tmp_path: Path, cifar_archive: Path) -> None:
    out = tmp_path / "out"
    env = {**_env(tmp_path), "OUT": str(out), "CIFAR10": str(cifar_archive),
           "VIRTUAL_ENV": os.environ.get("VIRTUAL_ENV") or sys.prefix,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    completed = subprocess.run(["bash", "benchmarks/device.sh", "--dry-run", "--only", "dense,qat,kd_cached"],
                               cwd=BENCHMARKS.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "no install" in completed.stdout and "suite at the smoke budget" in completed.stdout
    rows = _records(out / "suite_smoke.jsonl")
    _check_measured_rows(rows, (out / "RESULTS.md").read_text())
    assert rows["dense"]["config"]["budget"]["data_on_device"] is True  # the gpu budget's data path
    teacher, cached = rows["teacher"], rows["kd_cached"]  # the KD row trained its teacher first
    assert teacher["status"] == "ok" and teacher["params"] > 3 * RESNET20_PARAMS and "top1_bf16_autocast" in teacher
    assert cached["status"] == "ok" and cached["params"] == RESNET20_PARAMS
    assert "pytest exit 0" in completed.stdout or "pytest exit 5" in completed.stdout
    assert (out / "device_pytest.log").exists() and not (out / ".suite_work").exists()
