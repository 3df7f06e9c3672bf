"""Every script in ``benchmarks/`` runs end to end at its smallest settings and writes its results files.

Each script runs as ``python benchmarks/<script>.py ...`` runs it, in a process of its own: a fork of one that
imported torch, Lightning and the package once (:mod:`tests.script_forks`; started afresh, each would spend
8-10 s of a 2-core machine importing them), with ``--results-dir`` pointing into ``tmp_path``; scripts that read
CIFAR-10 get a tiny JPEG archive in the layout of the shared copy (:mod:`tests.data.cifar_fakes`). The checks
read the JSON and markdown the script wrote, and that the files of the same names in ``benchmarks/results/``
(the committed measurements) were left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.data.cifar_fakes import write_image_tree, write_tarball
from tests.script_forks import ScriptForks

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"
TIMEOUT_S = 300  # bounded, but far above the ~10-30 s each run takes on 2 busy cores


@dataclass(frozen=True)
class Case:
    """How one benchmark runs small and what its results must hold.

    Args:
        args: Command-line arguments; ``{data}`` stands for the fake CIFAR-10 archive, ``{tmp}`` for the
            test's temporary folder.
        check: Asserts on the written JSON (parsed) and markdown.
        name: ``--name`` to pass (the results files' base name); None: the script's default, its own name.
        extra_files: Other files the run must write into the results folder.
        setup: Called with the test's temporary folder and the archive before the run (e.g. to train a checkpoint).
    """

    args: tuple[str, ...]
    check: Callable[[dict[str, Any], str], None]
    name: str | None = None
    extra_files: tuple[str, ...] = ()
    setup: Callable[[Path, Path], None] | None = None


def check_channel_pruning(result: dict[str, Any], markdown: str) -> None:
    (row,) = result["results"]
    assert (row["model"], row["round_to"], row["latency"][0]["batch"]) == ("resnet20", 8, 1)
    assert row["macs"]["pruned"] < 0.6 * row["macs"]["dense"]  # --kept-macs 0.5, met from below
    assert row["params"]["pruned"] < row["params"]["dense"]
    assert all(0.0 <= acc <= 1.0 for acc in row["test_acc"].values())
    assert result["settings"]["epochs"] == 2 and "results_dir" not in result["settings"]
    assert f"| resnet20 | 8 | {row['params']['dense']:,} -> {row['params']['pruned']:,} | " in markdown
    assert "| model | round_to | epochs | dense test acc | pruned test acc |" in markdown


def check_factorization(result: dict[str, Any], markdown: str) -> None:
    rows = result["results"]
    assert [(r["variant"], r["kept_macs_target"]) for r in rows] == [("dense", None), ("tucker2", 0.5), ("channel", 0.5)]
    dense, tucker2, channel = rows
    assert dense["macs_ratio"] == 1.0 and tucker2["macs_ratio"] <= 0.5 and channel["macs_ratio"] <= 0.55
    assert tucker2["params"] < dense["params"] and tucker2["ranks"] and channel["ranks"] is None
    assert all(set(r["latency_ms"]) == {"eager_b1", "onnx_b1"} and 0.0 <= r["test_acc"] <= 1.0 for r in rows)
    assert result["settings"]["finetune_steps"] == 2
    assert "| resnet20 | tucker2 | 2x fewer | " in markdown and "- **resnet20, 2x fewer MACs** -- fastest" in markdown


def check_compression_artifact(result: dict[str, Any], markdown: str) -> None:
    assert result["settings"]["model"] == "resnet20"
    assert result["overall_sparsity"] > 0.8
    assert set(result["packed"]) == {"int8+lzma", "int8+zlib", "fp16+lzma", "fp16+zlib"}
    assert result["packed"]["int8+lzma"]["bytes"] < result["fp32_state_dict_bytes"] / 5
    assert markdown.startswith("# Packed artifact size: resnet20, 90% sparse + int8")
    assert "| int8+lzma | " in markdown and "**Result: " in markdown


def check_data_throughput(result: dict[str, Any], markdown: str) -> None:
    assert result["settings"]["splits"] == {"train": 26, "val": 4, "test": 20}  # 30 fake train images - 4
    assert result["settings"]["baseline_images"] == 8
    assert set(result["images_per_s_median"]) == {
        f"{name}@1t" for name in ("datamodule", "datamodule_loader_only", "float_tensor_batches",
                                  "float_tensor_dataloader")
    }
    assert all(rate > 0 for rate in result["images_per_s_median"].values())
    assert result["setup_s"]["first_was_cold"] is True
    assert "| iterator | 1 thread |" in markdown and "| `datamodule` | " in markdown
    assert "Splits: 26 train / 4 val / 20 test." in markdown


def check_deploy_accuracy(result: dict[str, Any], markdown: str) -> None:
    summary = result["result"]
    assert summary["engine"] == "x86" and summary["images"] == 20 and summary["optimizer_steps"] == 2  # whole split
    assert all(0 <= summary[key] <= 100 for key in ("fake_quant_accuracy", "int8_accuracy", "shipped_accuracy"))
    assert summary["trainer_test_accuracy"] == pytest.approx(summary["int8_accuracy"], abs=1e-4)  # what test() ran
    assert summary["difference_points"] == pytest.approx(summary["shipped_accuracy"] - summary["int8_accuracy"])
    assert 0 <= summary["top1_agreement"] <= 1 and summary["onnx_bytes"] > 0 and summary["unsaturated"] is not None
    assert set(result["machine"]["cpu"]) == {"model", "flags", "bf16"} and result["settings"]["qat_start"] == 0
    assert (f"| shipped file (`model_int8.onnx`, QDQ ONNX in onnxruntime CPU) | 20 | {summary['shipped_accuracy']:.2f} |"
            in markdown)


def check_deploy_latency(result: dict[str, Any], markdown: str) -> None:
    (row,) = result["rows"]
    assert (row["model"], row["threads"], row["batch"], row["repeats"]) == ("resnet20", 1, 1, 5)
    assert set(row["ms"]) == {"torch_fp32", "ort_fp32", "torch_int8_x86", "ort_quantize_static", "ours_qdq",
                              "ours_7bit", "openvino_qdq", "openvino_7bit", "openvino_ir", "executorch_int8"}  # AOTI left out: C++ build
    assert "7-bit vs ort fp32" in markdown and row["bytes"]["ours_7bit"] < row["bytes"]["ort_fp32"] / 2
    assert 0 < row["bytes"]["executorch_int8"] < row["bytes"]["ort_fp32"] / 2  # the xnnpack engine's int8 program
    (compile_s,) = result["openvino_compile_s"].values()
    assert compile_s["onnx"] > 0 and compile_s["ir"] > 0 and "from the QDQ ONNX file vs from its IR" in markdown
    assert "ours: the same file in OpenVINO" in markdown and "fastest int8" in markdown
    assert all(ms > 0 for ms in row["ms"].values()) and row["load_average_1min"] >= 0
    assert row["bytes"]["ours_qdq"] < row["bytes"]["ort_fp32"] / 2  # int8 weights in the file
    assert set(result["machine"]["cpu"]) == {"model", "flags", "bf16"}
    assert "| resnet20 | 1 | 1 | " in markdown and "ours vs `quantize_static`" in markdown
    ours = result["optimized_ops"]["resnet20"]["ours_qdq"]  # every conv an int8 kernel, no float op between
    assert ours["QLinearConv"] == 21 and not {"Conv", "FusedConv", "Clip", "Relu"} & set(ours)
    assert "| resnet20 | ours_qdq | 21 | 9 | 0 |" in markdown


def planned_resnet20_suite(tmp: Path, data: Path) -> None:
    """A suite results file holding one planned ResNet-20 row: every channel group at 8 (16 for the last stage)."""
    import torch

    from lightning_compress.models import create_model
    from lightning_compress.planning.widths import channel_space

    space = channel_space(create_model("resnet20", num_classes=10).eval(), torch.zeros(1, 3, 32, 32), ["fc"])
    widths = {group: 16 if dense == 64 else 8 for group, dense in space.widths.items()}
    record = {"row": "target50", "code_version": "abc", "target_plan": {"widths": widths}}
    (tmp / "suite.jsonl").write_text(json.dumps({"row": "dense"}) + "\n" + json.dumps(record) + "\n")


def check_latency_in_context(result: dict[str, Any], markdown: str) -> None:
    dense, planned = result["networks"]
    assert (dense["name"], planned["name"], planned["commit"]) == ("dense", "target50", "abc")
    assert result["settings"]["block"] in (0, 8, 16) and "suite" not in result["settings"]
    for network in (dense, planned):
        classes = network["classes"]
        # every convolution of the network is in the table and in the profile, in the same class
        assert sum(c["layers"] for c in classes) == sum(c["profiled_layers"] for c in classes) == 21
        assert all(c["layers"] == c["profiled_layers"] for c in classes)
        assert 0 < network["convolutions_in_network_ms"] <= network["profile_ms"] and network["table_ms"] > 0
        assert network["measured_ms"] > 0
    assert planned["table_ms"] < dense["table_ms"] and {c["in"] for c in planned["classes"]} == {3, 8, 16}
    assert "| dense |" in markdown and "## target50" in markdown and "in the network / table" in markdown


def check_timing_turns(result: dict[str, Any], markdown: str) -> None:
    (row,) = result["rows"]
    assert row["batch"] == 8 and set(row["ratios"]) == {"blocks", "turns"}
    assert all(len(ratios) == 2 and all(0 < r < 1 for r in ratios) for ratios in row["ratios"].values())
    assert row["spread"]["turns"] == pytest.approx((max(row["ratios"]["turns"]) - min(row["ratios"]["turns"]))
                                                   / statistics.median(row["ratios"]["turns"]))
    assert f"| 8 | turns | {row['ratios']['turns'][0]:.3f}, " in markdown and "| 8 | blocks |" in markdown


def check_latency_model(result: dict[str, Any], markdown: str) -> None:
    row, int8 = result["rows"]  # int8 after fp32: its planner has other candidates (no channel block), same sensitivity
    assert (row["model"], row["batch"], row["precision"], row["ratio"]) == ("resnet20", 8, "fp32", 0.6)
    assert (int8["precision"], int8["ratio"]) == ("int8", 0.6) and ("unreachable" in int8 or int8["block"] == 0)
    assert row["block"] in (0, 8, 16)
    assert row["dense_ms"] > row["measured_ms"] > 0 and row["predicted_ms"] > 0 and row["checks"] == 1
    assert row["target_ms"] == pytest.approx(0.6 * row["dense_ms"])
    assert row["floor"] >= 8 and row["floor"] % 8 == 0  # a width level (multiple of --round-to)
    assert row["prediction_error"] == pytest.approx(row["predicted_ms"] / row["measured_ms"] - 1)
    assert set(result["machine"]["cpu"]) == {"model", "flags", "bf16"}
    assert f"| resnet20 | 8 | fp32 | 0.6x dense | {row['dense_ms']:.3f} |" in markdown
    ratio_error = row["predicted_ms"] / row["dense_predicted_ms"] / (row["measured_ms"] / row["dense_ms"]) - 1
    assert f"| {ratio_error:+.1%} | {row['prediction_error']:+.1%} | " in markdown
    assert "Prediction within 10 %:" in markdown
    assert f"| {row['checks']} | {row['floor']} | {row['load_average_1min']} |" in markdown


def check_saturation_cost(result: dict[str, Any], markdown: str) -> None:
    (row,) = result["results"]
    assert row["model"] == "resnet18" and row["clamps"] >= 20  # every quantized value of a ResNet-18
    (cell,) = row["latency"]
    assert cell["batch"] == 1 and cell["plain_ms"] > 0 and cell["clamped_ms"] > 0
    assert cell["cost"] == pytest.approx(cell["clamped_ms"] / cell["plain_ms"] - 1)
    assert set(result["machine"]["cpu"]) == {"model", "flags", "bf16"}
    errors = row["worst_layer_error_steps"]
    assert errors["with_clamps"] <= 1.01  # with the clamps every layer computes what its int8 input says
    assert f"| resnet18 | {row['clamps']} | {errors['without_clamps']:.0f} / {errors['with_clamps']:.0f} | 1 | " in markdown


def check_distillation(result: dict[str, Any], markdown: str) -> None:
    steps = result["overhead"]["median_step_cpu_ms"]
    assert set(steps) == {"student", "student_plus_teacher", "kd_online", "kd_cached", "teacher_forward"}
    assert all(ms > 0 for ms in steps.values())
    assert result["settings"]["steps"] == 1
    rows = result["accuracy"]["rows"]
    assert [(r["model"], r["kd"]) for r in rows] == [
        ("resnet56 (teacher)", False), ("resnet20", False), ("resnet20", True)
    ]
    assert all(0 <= r["test_acc"] <= 100 for r in rows)
    assert "## Overhead (CPU, teacher resnet56, student resnet20, median step time)" in markdown
    assert "| kd_cached | " in markdown and "| resnet20 | True | " in markdown



def check_model_coverage(result: dict[str, Any], markdown: str) -> None:
    assert [(r["model"], r["technique"], r["status"]) for r in result["results"]] == [
        ("zoo:resnet20", "magnitude", "works"), ("zoo:resnet20", "channel", "works")
    ]
    assert result["results"][0]["numbers"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result["results"][1]["numbers"]["macs_ratio"] <= 0.61
    assert result["settings"]["steps"] == 3 and result["machine"]["cpu"]["model"]
    assert "2 cells: 2 work, 0 refused up front" in markdown and "| zoo:resnet20 | works: 50% of " in markdown

def check_pruning_accuracy(result: dict[str, Any], markdown: str) -> None:
    dense, pruned = result["rows"]
    assert (dense["method"], pruned["method"]) == ("dense", "GMP")
    assert dense["achieved_sparsity"] == 0 and pruned["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert dense["optimizer_steps"] == 4  # --quick: 1 epoch, 30 fake images in batches of 8
    assert "QUICK smoke run" in result["budget"]
    assert result["settings"]["quick"] and "results_dir" not in result["settings"]
    assert "| GMP | 50% | 50.00% | " in markdown
    assert "![accuracy vs sparsity](pruning_accuracy_smoke.png)" in markdown  # the figure follows --name


def check_pruning_overhead(result: dict[str, Any], markdown: str) -> None:
    summary = result["step_time"]["summary"]
    assert set(summary) == {"none", "magnitude", "model_pruning", "qat", "kd_self", "report"}
    assert all(config["median_ms"] > 0 and config["setup_s"] > 0 for config in summary.values())
    assert summary["none"]["setup_extra_s"] == 0
    assert [row["model"] for row in result["mask_update"]] == ["resnet20", "resnet56"]
    assert result["settings"]["batch_size"] == 2
    assert "## Training step time, ResNet-20, batch 2, CPU" in markdown
    assert "| resnet56 | 56 | " in markdown


def check_quantization(result: dict[str, Any], markdown: str) -> None:
    (row,) = result["latency"]
    assert (row["model"], row["engine"], row["batch"]) == ("resnet20", "x86", 1)
    assert row["repeats"] == 30  # --quick
    assert row["int8_bytes"] < row["fp32_bytes"] / 3
    assert result["settings"]["engines"] == ["x86"] and "results_dir" not in result["settings"]
    (accuracy,) = result["accuracy"]
    assert set(accuracy["results"]) == {"fp32", "ptq (x86)", "qat@0"}
    assert all(0.0 <= acc <= 1.0 for acc in accuracy["results"].values())
    assert set(accuracy["sizes"]) == {"ptq (x86)", "qat@0"}
    for sizes in (row, *accuracy["sizes"].values()):  # deflated int8 artifact vs fp32 files
        assert 0.2 < sizes["deployed_size_ratio"] < 0.3 and 0.2 < sizes["artifact_size_ratio"] < 0.3
    assert "| resnet20 | x86 | 1 | " in markdown and "| resnet20 | 1 | qat@0 | " in markdown


def check_quickstart_time(result: dict[str, Any], markdown: str) -> None:
    command = "lightning-compress fit --config recipes/quickstart.yaml --data.root="
    assert result["command"].startswith(command)  # the arguments after `--` are recorded
    assert result["wall_seconds"] > 0
    assert 0.0 <= result["test_acc_int8"] <= 1.0  # parsed from the command's output
    assert markdown.startswith("# Quickstart wall time") and "test accuracy of the int8" in markdown


def check_train_throughput(result: dict[str, Any], markdown: str) -> None:
    cpu = [row for row in result["rows"] if row["device"] == "cpu"]
    assert [(row["model"], row["batch_size"]) for row in cpu] == [("resnet20", 2)]
    assert cpu[0]["contiguous_img_per_s"] > 0 and cpu[0]["channels_last_img_per_s"] > 0
    assert result["settings"] == {"batch_size": 2, "steps": 1, "rounds": 1}
    assert "| resnet20 | cpu | 2 | " in markdown


CHROMIUM = shutil.which("chromium") is not None  # Debian's, for the TensorBoard screenshot; not in CI


def check_tensorboard_screenshot(result: dict[str, Any], markdown: str) -> None:
    (tags,) = result["tags"].values()  # the one produced run, as TensorBoard's scalars API listed it
    assert {"sparsity/global", "sparsity/target", "quant/weight_error/model.conv1"} <= set(tags)
    assert result["produced"]["data"] == "cifar10-jpeg.tar.gz" and result["settings"]["steps"] == 6
    assert result["url"].startswith("http://127.0.0.1:<port>/#scalars&tagFilter=")
    assert markdown.startswith("# What you see in TensorBoard: sparsity and quantization curves")
    if CHROMIUM:
        assert "![TensorBoard sparsity and quant curves](tensorboard_smoke.png)" in markdown
        assert result["ink_fraction"] > 0.03 and result["chromium"].startswith("Chromium")
    else:
        assert "Screenshot skipped" in markdown and result["chromium"] is None


def train_row_checkpoint(tmp: Path, data: Path) -> None:
    """A ResNet-20 checkpoint of a few steps, half its weights pruned, as the suite keeps one per row."""
    import lightning.pytorch as pl

    from lightning_compress import CIFARDataModule, ImageClassifier, MagnitudePruning

    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[MagnitudePruning(final_sparsity=0.5, start=0.0, end="2steps", update_every=1)])
    trainer.fit(ImageClassifier("resnet20"), datamodule=CIFARDataModule(root=str(data), download=False, batch_size=4,
                                                                      val_size=4, cache_dir=str(tmp / "cache")))
    trainer.save_checkpoint(tmp / "row.ckpt")


def check_split_gap(result: dict[str, Any], markdown: str) -> None:
    (row,) = result["rows"]
    assert row["checkpoint"] == "row.ckpt" and 0.3 < row["sparsity"] < 0.6
    for measured in (row["as_trained"], row["bn_reestimated"]):
        assert all(0 <= measured[split] <= 100 for split in ("train", "val", "test"))
        assert len(measured["val_per_class"]) == len(measured["test_per_class"]) == 10
    assert "| row.ckpt | " in markdown and "BN re-estimated" in markdown


DEPLOY_PARITY_ARGS = ("--models", "resnet20", "--engines", "onnxruntime", "--images", "16", "--batch-size", "4",
                      "--data", "{data}", "--work-dir", "{tmp}/work")


def deploy_parity_to_reuse(tmp: Path, data: Path) -> None:
    """A first deploy_parity run (3 QAT steps, export) into ``{tmp}/work``, its results checked; the case then
    compares its checkpoint and export again with ``--reuse``."""
    args = [arg.replace("{data}", str(data)).replace("{tmp}", str(tmp)) for arg in DEPLOY_PARITY_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIGHTNING_COMPRESS_CACHE": str(tmp / "cache")}
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "deploy_parity.py"), "--results-dir", str(tmp),
                                "--steps", "3", *args], check=False, cwd=BENCHMARKS.parent, env=env,
                               capture_output=True, text=True, timeout=TIMEOUT_S)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-6000:]
    check_deploy_parity(json.loads((tmp / "deploy_parity.json").read_text()), (tmp / "deploy_parity.md").read_text())


def check_deploy_parity_reused(result: dict[str, Any], markdown: str) -> None:
    (row,) = result["rows"]
    assert row["reused"] and row["steps"] is None and row["export_status"] is None
    assert row["runtimes"]["onnxruntime"]["top1_agreement"] == 1.0 and row["runtimes"]["openvino"]["images"] == 16
    assert "the checkpoint and export of an earlier run in the work folder (`--reuse`)" in markdown
    for runtime in row["runtimes"].values():
        assert runtime["disagreeing"] == round((1 - runtime["top1_agreement"]) * 16)
        assert 0.0 <= runtime["median_margin"] <= 1.0
    assert "- resnet20, engine onnxruntime, onnxruntime: 0 images, median margin there -" in markdown


def check_deploy_parity(result: dict[str, Any], markdown: str) -> None:
    (row,) = result["rows"]
    assert (row["model"], row["engine"], row["steps"], row["export_status"]) == ("resnet20", "onnxruntime", 3, 0)
    assert not row["reused"]
    assert set(row["runtimes"]) == {"onnxruntime", "openvino"} and row["in_process"] == "OnnxRuntimeNetwork"
    assert row["tested"] == "OnnxRuntimeNetwork"  # the onnxruntime engine tests the QDQ model it converted to
    assert 1 <= row["classes_predicted"] <= 10 and "classes it predicts on these images: " in markdown
    for runtime in row["runtimes"].values():
        assert runtime["images"] == 16 and runtime["bytes"] > 100_000 and runtime["export_check"]["images"] == 16
        assert 0.0 <= runtime["top1_agreement"] <= 1.0
        assert runtime["versus_tested"]["top1_agreement"] == runtime["top1_agreement"]  # one and the same reference
    assert row["runtimes"]["onnxruntime"]["top1_agreement"] == 1.0  # the exported file is the tested model
    assert "| resnet20 | onnxruntime | openvino | 16 | " in markdown and "agreement with what test() runs" in markdown


def test_split_gap_fits_the_gap_against_test_accuracy():
    sys.path.insert(0, str(BENCHMARKS))
    import split_gap

    rows = [{"as_trained": {"val": v, "test": t}} for v, t in ((84.0, 83.0), (86.0, 85.5), (88.0, 88.0))]
    (_, line) = split_gap.trend(rows)
    assert "-0.200 points of gap per point" in line and "r = -1.00" in line and "at 83.00 %: +1.00" in line
    assert split_gap.trend(rows[:2]) == []


def check_int8_exactness(result: dict[str, Any], markdown: str) -> None:
    readings = result["readings"]
    assert result["exact_code"] == 127 and set(readings) == {"127", "63"} and len(readings["127"]) == 4
    precise = next(read for runtime, read in readings["127"].items() if "onnx_session" in runtime)
    assert precise == [127]  # our sessions are exact on every x86 CPU
    assert all(read in ([127], [64]) for read in readings["127"].values())  # exact, or pairs saturated in int16
    assert all(read == [63] for read in readings["63"].values())  # 7-bit weights: exact in every runtime
    assert markdown.count(" | yes |") + markdown.count(" | NO |") == 8


CASES = {
    "channel_pruning": Case(
        ("--models", "resnet20", "--round-to", "8", "--batches", "1", "--repeats", "1", "--rounds", "1",
         "--threads", "1", "--epochs", "2", "--batch-size", "2", "--val-size", "10", "--data", "{data}"),
        check_channel_pruning,
    ),
    "compression_artifact": Case((), check_compression_artifact),
    "factorization": Case(
        ("--models", "resnet20", "--kept-macs", "0.5", "--methods", "tucker2", "--batch-size", "2", "--val-size",
         "4", "--pretrain-steps", "1", "--finetune-steps", "2", "--test-size", "8", "--batches", "1",
         "--repeats", "1", "--rounds", "1", "--threads", "1", "--data", "{data}"),
        check_factorization,
    ),
    "data_throughput": Case(
        ("--archive", "{data}", "--val-size", "4", "--batch-size", "4", "--threads", "1", "--seconds", "0.01",
         "--rounds", "1", "--baseline-images", "8"),
        check_data_throughput,
    ),
    "deploy_accuracy": Case(
        ("--batch-size", "4", "--limit-train-batches", "2", "--eval-batch-size", "10", "--precision", "32-true",
         "--threads", "1", "--qat-start", "0", "--data", "{data}"),
        check_deploy_accuracy,
    ),
    "deploy_latency": Case(
        ("--models", "resnet20", "--batches", "1", "--threads", "1", "--repeats", "1", "--calibration-batches", "1",
         "--runtimes", "openvino", "executorch"),
        check_deploy_latency,
    ),
    "latency_in_context": Case(
        ("--model", "resnet20", "--rows", "target50", "--suite", "{tmp}/suite.jsonl", "--batch", "2", "--calls", "2",
         "--repeats", "2", "--rounds", "1"),
        check_latency_in_context, setup=planned_resnet20_suite,
    ),
    "timing_turns": Case(
        ("--model", "resnet20", "--batches", "8", "--measurements", "2", "--repeats", "3", "--rounds", "2"),
        check_timing_turns,
    ),
    "latency_model": Case(
        ("--models", "resnet20", "--batches", "8", "--precisions", "fp32", "int8", "--ratios", "0.6", "--rounds", "1",
         "--repeats", "3", "--checks", "1"),
        check_latency_model,
    ),
    "int8_exactness": Case((), check_int8_exactness),
    "saturation_cost": Case(
        ("--models", "resnet18", "--batches", "1", "--rounds", "1", "--repeats", "1", "--steps", "1"),
        check_saturation_cost,
    ),
    "distillation": Case(
        ("--batch-size", "2", "--steps", "1", "--rounds", "1", "--accuracy-epochs", "1", "--limit-batches",
         "1", "--students", "resnet20", "--data", "{data}"),
        check_distillation,
    ),
    "model_coverage": Case(
        ("--models", "zoo:resnet20", "--techniques", "magnitude", "channel", "--steps", "3", "--batch", "2",
         "--rounds", "1", "--threads", "1"),
        check_model_coverage,
    ),
    "pruning_accuracy": Case(
        ("--quick", "--sparsities", "0.5", "--batch-size", "8", "--data", "{data}"),
        check_pruning_accuracy, name="pruning_accuracy_smoke", extra_files=("pruning_accuracy_smoke.png",),
    ),
    "pruning_overhead": Case(
        ("--steps", "2", "--rounds", "1", "--repeats", "1", "--batch-size", "2"), check_pruning_overhead
    ),
    "quantization": Case(
        ("--quick", "--models", "resnet20", "--batches", "1", "--engines", "x86", "--accuracy-epochs", "1",
         "--qat-starts", "0", "--val-size", "0", "--data-root", "{data}"),
        check_quantization,
    ),
    "quickstart_time": Case(
        ("--", "--data.root={data}", "--data.val_size=4", "--data.batch_size=4"), check_quickstart_time
    ),
    "tensorboard_screenshot": Case(
        ("--steps", "6", "--batch-size", "4", "--data", "{data}", "--run-dir", "{tmp}/runs",
         *(() if CHROMIUM else ("--skip-screenshot",))),
        check_tensorboard_screenshot, name="tensorboard_smoke",
        extra_files=("tensorboard_smoke.png",) if CHROMIUM else (),
    ),
    "deploy_parity": Case((*DEPLOY_PARITY_ARGS, "--reuse"), check_deploy_parity_reused, setup=deploy_parity_to_reuse),
    "split_gap": Case(
        ("{tmp}/row.ckpt", "--data", "{data}", "--val-size", "4", "--bn-batches", "2", "--train-images", "8"),
        check_split_gap, setup=train_row_checkpoint,
    ),
    "train_throughput": Case(
        ("--models", "resnet20", "--batch-size", "2", "--steps", "1", "--rounds", "1"), check_train_throughput
    ),
}
SLOW = {"quickstart_time", "factorization", "latency_model"}
"""~30-45 s: the lightning-compress command in its own process; 3 ONNX exports; a latency table and 4 ONNX exports."""


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30-train / 20-test image CIFAR-10 ``.tar.gz`` of JPEGs, laid out like the shared copy."""
    root = tmp_path_factory.mktemp("cifar")
    write_image_tree(root / "tree", n_train=3, n_test=2, fmt="jpg")
    return write_tarball(root / "tree", root / "cifar10-jpeg.tar.gz")


@pytest.fixture(scope="module")
def script_forks() -> Iterator[ScriptForks]:
    """Runs each script in a fork of one process that imported torch, Lightning and the package once."""
    forks = ScriptForks({**os.environ, "OMP_NUM_THREADS": "1"})
    yield forks
    forks.close()


def committed_versions(names: list[str]) -> dict[str, tuple[int, int] | None]:
    """Modification time and size of each named file in ``benchmarks/results/`` (None where absent)."""
    paths = [RESULTS / name for name in names]
    return {path.name: (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else None
            for path in paths}


LIBRARY_MODULES = {"reporting", "suite_measure", "suite_queue", "suite_rows", "suite_report"}
"""Modules the scripts import, not scripts themselves."""
TESTED_ELSEWHERE = {"suite": "tests/test_suite.py"}


def test_every_benchmark_script_has_a_case():
    scripts = {path.stem for path in BENCHMARKS.glob("*.py")} - LIBRARY_MODULES - set(TESTED_ELSEWHERE)
    assert scripts == set(CASES)


def test_every_script_answers_a_usage_error_in_one_line_with_exit_code_2(tmp_path, script_forks):
    for script in [*CASES, *TESTED_ELSEWHERE]:
        output = tmp_path / f"{script}.txt"
        completed = script_forks.run([BENCHMARKS / f"{script}.py", "--no-such-option"], BENCHMARKS.parent,
                                     dict(os.environ), TIMEOUT_S, output)
        assert completed.returncode == 2, f"{script}: {completed.stdout[-3000:]}"
        (line,) = completed.stdout.splitlines()
        assert line.startswith(f"{script}.py: error: ") and line.endswith(f" (see {script}.py --help)"), line


@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=[pytest.mark.slow] if s in SLOW else []) for s in CASES]
)
def test_benchmark_writes_its_results(script, tmp_path, cifar_archive, script_forks):
    case = CASES[script]
    name = case.name or script
    out = tmp_path / "results"
    out.mkdir()
    args = [arg.replace("{data}", str(cifar_archive)).replace("{tmp}", str(tmp_path)) for arg in case.args]
    if case.name:
        args = ["--name", case.name, *args]
    # one torch thread: 2 OpenMP threads spin against other processes on a busy 2-core machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIGHTNING_COMPRESS_CACHE": str(tmp_path / "cache")}
    files = [f"{name}.json", f"{name}.md", *case.extra_files]
    before = committed_versions(files)
    if case.setup is not None:
        case.setup(tmp_path, cifar_archive)
    completed = script_forks.run([BENCHMARKS / f"{script}.py", "--results-dir", out, *args], BENCHMARKS.parent, env,
                                 TIMEOUT_S, tmp_path / "output.txt")
    assert completed.returncode == 0, f"{script} failed:\n{completed.stdout[-6000:]}"
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert committed_versions(files) == before, "a committed file in benchmarks/results/ was overwritten"
    result = json.loads((out / f"{name}.json").read_text())
    assert result["machine"]["cpu_count"] == os.cpu_count()
    case.check(result, (out / f"{name}.md").read_text())
    for extra in case.extra_files:
        assert (out / extra).read_bytes().startswith(b"\x89PNG")
