"""CompressionReport on a user's LightningModule with real pruning, a real Trainer and TensorBoard files."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_compress.pruning import MagnitudePruning
from lightning_compress.report import CompressionReport, render_markdown, summarize
from tests.events import read_scalars
from tests.test_commands import trainer
from tests.toy import ToyConvNet, UserClassifier, random_loader


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="values must be one of"):
        CompressionReport(values="int4")
    with pytest.raises(ValueError, match="latency_repeats"):
        CompressionReport(latency_repeats=0)


def test_summary_counts_layers_sizes_and_latency():
    net = ToyConvNet()
    with torch.no_grad():
        net.conv2.weight.mul_(torch.arange(net.conv2.weight.numel()).view_as(net.conv2.weight) % 4 == 0)
    summary = summarize(net, torch.randn(1, 3, 16, 16), latency_batch_sizes=(1, 4), latency_repeats=2)
    rows = {r["name"]: r for r in summary["layers"]}
    assert list(rows) == ["stem", "conv1", "conv2", "fc"]
    assert rows["conv2"]["sparsity"] == pytest.approx(0.75) and rows["conv2"]["bits"] == 32
    assert rows["conv2"]["macs"] == 16 * 16 * 9 * 8 * 8  # Cout * Cin * k * k * Hout * Wout
    assert summary["totals"]["macs"] == sum(r["macs"] for r in rows.values())
    assert summary["sizes"]["ratio"] == summary["sizes"]["fp32_bytes"] / summary["sizes"]["packed_bytes"] > 1
    assert set(summary["latency"]["batches"]) == {"1", "4"}
    for timing in summary["latency"]["batches"].values():  # the speed-up is dense over compressed, as timed
        assert timing["dense_ms"] > 0 and timing["speedup"] == pytest.approx(timing["dense_ms"] / timing["compressed_ms"])
        assert timing["speedup_vs_onnxruntime"] == pytest.approx(timing["dense_onnxruntime_ms"] / timing["compressed_ms"])
    assert summary["latency"]["onnxruntime_baseline"] == "the dense network as fp32 ONNX, onnxruntime"
    assert "| dense fp32 eager torch (ms) | dense fp32 onnxruntime (ms) |" in render_markdown(summary)
    assert "| conv2 | Conv2d | 16x16x3x3 | 2,304 | 576 | 75.0% | 32 |" in render_markdown(summary)


def test_callback_reports_a_pruned_user_module_to_files_and_tensorboard(tmp_path):
    report = CompressionReport(dirpath=str(tmp_path / "report"), latency_batch_sizes=(1,), latency_repeats=2)
    pruning = MagnitudePruning(final_sparsity=0.75, scope="layerwise", schedule="constant", end=1.0)
    logger = TensorBoardLogger(tmp_path / "tb", name="", version="")
    run = trainer(tmp_path, [report, pruning], logger=logger, steps=3)  # report listed first: still runs last
    run.fit(UserClassifier(), random_loader(48), random_loader(16))
    summary = json.loads((tmp_path / "report" / "compression_report.json").read_text())
    rows = {r["name"]: r for r in summary["layers"]}
    assert rows["net.conv1"]["sparsity"] == pytest.approx(0.75, abs=0.01)  # MagnitudePruning's default layers
    assert rows["net.stem"]["sparsity"] == 0.0
    assert summary["accuracy"] is None  # UserClassifier logs no val/acc
    assert (tmp_path / "report" / "compression_report.md").read_text().startswith("# Compression report")
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["compression/size_ratio"][-1][1] == pytest.approx(summary["sizes"]["ratio"], rel=1e-5)
    assert "compression/latency_speedup_b1" in scalars and "sparsity/report_layers" in scalars
    ort = summary["latency"]["batches"]["1"]  # the baseline a deployment picks: the dense fp32 ONNX in onnxruntime
    assert scalars["compression/latency_speedup_vs_onnxruntime_b1"][-1][1] == pytest.approx(
        ort["dense_onnxruntime_ms"] / ort["compressed_ms"], rel=1e-5)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert "compression/layer_sparsity" in events.Tags()["images"]
    assert "compression/report/text_summary" in events.Tags()["tensors"]


def test_callback_records_accuracy_before_and_after(tmp_path):
    from lightning.pytorch.callbacks import Callback

    from lightning_compress.module import ImageClassifier

    class Seen(Callback):
        values: list[float] = []

        def on_validation_end(self, trainer, pl_module):
            self.values.append(float(trainer.callback_metrics["val/acc"]))

    report, seen = CompressionReport(dirpath=str(tmp_path), latency_batch_sizes=()), Seen()
    run = trainer(tmp_path, [report, seen], steps=12)
    run.limit_val_batches, run.val_check_interval = 1, 6
    run.fit(ImageClassifier("resnet20", num_classes=4, lr=0.05), random_loader(192, shuffle=True),
            random_loader(64, batch_size=64, seed=1))
    accuracy = report.summary["accuracy"]
    assert len(seen.values) == 2 and seen.values[0] != seen.values[1], "before and after must differ to be told apart"
    assert accuracy["metric"] == "val/acc"
    assert (accuracy["before"], accuracy["after"]) == pytest.approx((seen.values[0], seen.values[-1]))
    assert report.state_dict()["accuracy"] == {"before": accuracy["before"], "after": accuracy["after"]}
    row = f"| {accuracy.get('source', '')} | {accuracy['before']:.4f} | {accuracy['after']:.4f} |"
    assert row in (tmp_path / "compression_report.md").read_text()
    assert "| n/a | n/a |" in render_markdown({**report.summary, "accuracy": {**accuracy, "before": None, "after": None}})


@pytest.mark.parametrize("report_first", [True, False])
def test_report_sees_the_int8_model_that_qat_puts_in_place(tmp_path, report_first):
    from lightning_compress.quantization import QuantizationAwareTraining
    from lightning_compress.report import is_int8

    report = CompressionReport(dirpath=str(tmp_path), latency_batch_sizes=(2,), latency_repeats=1)
    qat = QuantizationAwareTraining()
    pruning = MagnitudePruning(final_sparsity=0.5, start=0.0, end=0.5, update_every=1)
    callbacks = [report, pruning, qat] if report_first else [pruning, qat, report]
    module = UserClassifier()
    trainer(tmp_path, callbacks, steps=4).fit(module, random_loader(64))
    assert is_int8(module.net)
    summary = report.summary
    assert summary["latency"]["compressed_model"] == "int8"  # timed the int8 model, not the fake-quant one
    assert summary["totals"]["layer_sparsity"] > 0.3


def test_is_int8_tells_a_pt2e_engines_shipped_program_from_an_fp32_one():
    from lightning_compress.export.executorch import ExecuTorchNetwork, pte_bytes
    from lightning_compress.quantization import quantize_static
    from lightning_compress.report import is_int8

    net = UserClassifier().net.eval()
    images = random_loader(16).dataset.tensors[0]
    assert is_int8(quantize_static(net, [(images,)], engine="xnnpack"))
    assert not is_int8(ExecuTorchNetwork(pte_bytes(net, images[:2])))


class _DataDependentBranch(nn.Module):
    """Branches on its input's values: eager torch runs it, the ONNX exporter cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_summary_without_an_onnx_baseline_says_why_and_keeps_eager_timing():
    summary = summarize(_DataDependentBranch(), torch.ones(1, 4), latency_batch_sizes=(1,), latency_repeats=2)
    timing = summary["latency"]["batches"]["1"]
    assert summary["latency"]["onnxruntime_baseline"].startswith("not timed: the ONNX exporter cannot export")
    assert "speedup_vs_onnxruntime" not in timing and timing["speedup"] > 0
    assert f"| 1 | {timing['dense_ms']:.2f} | - | {timing['compressed_ms']:.2f} | - |" in render_markdown(summary)
