"""recipes/resnet56_full_pipeline.yaml through the command line on tiny data: all four effects in one fit."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from lightning_compress.cli import main
from lightning_compress.module import ImageClassifier
from tests.events import read_scalars
from tests.test_cli import write_image_folder

RECIPE = Path(__file__).parents[2] / "recipes" / "resnet56_full_pipeline.yaml"


@pytest.mark.slow
def test_full_pipeline_recipe_shows_all_four_effects(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe reads the teacher from checkpoints/ under the working directory
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(ImageClassifier("resnet56"))
    trainer.save_checkpoint(tmp_path / "checkpoints" / "resnet56_teacher" / "best.ckpt")
    write_image_folder(tmp_path / "tree", per_class=8)
    recipe = yaml.safe_load(RECIPE.read_text())
    for callback in recipe["trainer"]["callbacks"]:  # this run has 4 epochs of 7 steps
        if callback["class_path"].endswith(("MagnitudePruning", "ChannelPruning")):
            callback["init_args"]["update_every"] = 2
        if callback["class_path"].endswith("CompressionReport"):
            callback["init_args"] = {"latency_batch_sizes": [1], "latency_repeats": 1}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(recipe))
    main([
        "fit", "--config", str(tmp_path / "pipeline.yaml"),
        f"--data.root={tmp_path / 'tree'}", f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.val_size=10", "--data.batch_size=10", "--trainer.log_every_n_steps=1",
        "--trainer.max_epochs=4",  # the recipe's own precision (fp32): bf16-mixed is the matrix's (whole set)
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ])
    assert "test/acc" in capsys.readouterr().out
    report = json.loads(next((tmp_path / "runs").rglob("compression_report.json")).read_text())
    assert report["totals"]["macs_ratio"] <= 0.5 * 1.01  # channel pruning reached half the MACs
    assert report["totals"]["layer_sparsity"] > 0.45  # magnitude masks, through int8 conversion
    assert report["latency"]["compressed_model"] == "int8"
    assert {t["callback"] for t in report["techniques"]} == {
        "ChannelPruning", "MagnitudePruning", "KnowledgeDistillation", "QuantizationAwareTraining"}
    scalars = read_scalars(tmp_path / "runs")
    for tag in ("macs/ratio", "sparsity/global", "distill/kd_loss", "test/acc"):
        assert tag in scalars, f"{tag} not logged; logged: {sorted(scalars)}"
