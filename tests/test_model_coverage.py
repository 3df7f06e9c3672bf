"""The fast subset of ``benchmarks/model_coverage.py``: each cell works, or is refused before training.

The cells are the benchmark's own (:func:`model_coverage.run_cell`: a fresh network, the callback, a real
``Trainer.fit`` of a few steps on random data, then ``trainer.test``), on the networks that broke before:
torchvision's ShuffleNetV2 (int8 failed at the first test batch; channel pruning failed inside
torch-pruning) and Lightning's demo transformer (attention projections left dense).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_coverage  # noqa: E402 -- a script beside the package, importable once its folder is on the path

ARGS = argparse.Namespace(steps=3, batch=4, rounds=1)


def _cell(model: str, technique: str) -> dict:
    return model_coverage.run_cell(model, model_coverage.subjects()[model], technique, ARGS)


@pytest.mark.parametrize("technique", ["qat", "ptq"])
def test_shufflenet_int8_model_runs_the_test_loop(technique):
    row = _cell("shufflenet_v2_x0_5", technique)
    assert row["status"] == "works", row.get("traceback", row["summary"])
    numbers = row["numbers"]
    assert numbers["int8_modules"] >= 20 and 0.2 < numbers["size_ratio"] < 0.35
    assert numbers["latency"]["compressed_ms"] > 0


def test_shufflenet_channel_pruning_is_refused_before_the_first_step_naming_the_shuffle():
    row = _cell("shufflenet_v2_x0_5", "channel")
    assert row["status"] == "refused" and row["optimizer_steps_done"] == 0
    assert row["summary"].startswith("ValueError: channel pruning cannot slim this network: module 'stage2.0' "
                                     "(InvertedResidual) views its (1, 48, 4, 4) activation as (1, 2, 24, 4, 4)")
    assert "MagnitudePruning(pattern='channel')" in row["summary"]


def test_demo_transformer_attention_projections_are_pruned_by_default():
    row = _cell("LightningTransformer", "magnitude")
    assert row["status"] == "works", row.get("traceback", row["summary"])
    numbers = row["numbers"]
    # 2 encoder self-attentions, 2 decoder self-attentions, 2 decoder cross-attentions
    assert len(numbers["attention_matrices"]) == 6
    assert all(name.endswith(".in_proj_weight") for name in numbers["attention_matrices"])
    assert numbers["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_demo_transformer_quantization_is_refused_up_front_with_the_remedy():
    row = _cell("LightningTransformer", "qat")
    assert row["status"] == "refused" and row["optimizer_steps_done"] == 0
    assert row["summary"].startswith("ValueError: cannot trace module 'model' for quantization")  # the network itself
    assert "skip its children or simplify that forward" in row["summary"]


def test_zoo_resnet20_channel_pruning_reaches_the_target_with_default_rounding():
    row = _cell("zoo:resnet20", "channel")
    assert row["status"] == "works", row.get("traceback", row["summary"])
    assert row["numbers"]["macs_ratio"] <= 0.61 and row["numbers"]["params_ratio"] < 1.0


def test_rendered_table_shows_refusals_and_counts():
    rows = [
        {"model": "zoo:resnet20", "group": "zoo", "technique": "magnitude", "status": "works",
         "summary": "50% of 99% of weights zeroed"},
        {"model": "zoo:resnet20", "group": "zoo", "technique": "channel", "status": "refused",
         "summary": "ValueError: a | b"},
    ]
    machine = {"cpu": {"model": "CPU", "flags": ["avx2"]}, "cpu_count": 2, "torch": "2", "load_average_1_5_15": [0]}
    markdown = model_coverage.render(rows, machine, {"steps": 3, "batch": 4, "rounds": 1}, model_coverage.subjects())
    assert "2 cells: 1 work, 1 refused up front" in markdown and "0 fail." in markdown
    assert "| zoo:resnet20 | works: 50% of 99% of weights zeroed | refused: ValueError: a \\| b |" in markdown


def test_zero_initialised_batchnorm_is_refused_before_quantization_aware_training_steps():
    import lightning.pytorch as pl
    import torchvision

    from lightning_compress import ImageClassifier, QuantizationAwareTraining

    network = torchvision.models.resnet18(weights=None, num_classes=10, zero_init_residual=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[QuantizationAwareTraining()])
    with pytest.raises(ValueError, match=r"gamma\) is exactly 0 in 8 Conv-BN layer\(s\) \['layer1.0.conv2', .*start=0.5"):
        trainer.fit(ImageClassifier(model=network, num_classes=10), model_coverage._loader(
            model_coverage.subjects()["resnet18"], samples=8, batch=4))
    assert trainer.global_step == 0


@pytest.mark.slow  # ~30 s on 2 busy cores
def test_timm_vision_transformer_is_pruned_and_quantized():
    pytest.importorskip("timm", reason="the optional [timm] extra")
    for technique in ("magnitude", "ptq"):
        row = _cell("timm:vit_tiny_patch16_224@32", technique)
        assert row["status"] == "works", row.get("traceback", row["summary"])
    assert row["numbers"]["int8_modules"] > 40  # qkv, proj and MLP Linears of 12 blocks


def test_efficientnet_b0_converts_to_int8_after_quantization_aware_training():
    """Failed late before: stochastic depth traced in train mode, int8 weights one code off the trained ones."""
    row = _cell("efficientnet_b0", "qat")
    assert row["status"] == "works", row.get("traceback", row["summary"])
    assert row["numbers"]["int8_modules"] >= 80


@pytest.mark.parametrize("model", ["timm:efficientnet_b0", "timm:mobilenetv3_large_100", "timm:ghostnet_100"])
def test_timm_networks_with_batch_norm_activation_layers_convert_to_int8(model):
    """Failed late before: BatchNormAct2d traced in train mode (batch statistics in eval, errors at batch 1),
    and activations above the trained range overflowing the depthwise convolutions' int16 pair sums."""
    pytest.importorskip("timm", reason="the optional [timm] extra")
    row = _cell(model, "qat")
    assert row["status"] == "works", row.get("traceback", row["summary"])
    assert row["numbers"]["int8_modules"] >= 50
