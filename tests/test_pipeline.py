"""The full prune -> distill -> quantize recipe, end to end through the command line, on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import yaml

from lightning_compress.cli import main
from lightning_compress.module import ImageClassifier
from tests.events import read_scalars
from tests.test_cli import write_image_folder

RECIPE = Path(__file__).parents[1] / "recipes" / "resnet20_pipeline.yaml"


def test_pipeline_recipe_prunes_distills_and_quantizes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe reads the teacher from checkpoints/ under the working directory
    teacher_path = tmp_path / "checkpoints" / "resnet56_teacher" / "best.ckpt"
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(ImageClassifier("resnet56"))
    trainer.save_checkpoint(teacher_path)
    write_image_folder(tmp_path / "tree", per_class=8)
    recipe = yaml.safe_load(RECIPE.read_text())
    callbacks = recipe["trainer"]["callbacks"]
    pruning = next(cb for cb in callbacks if cb["class_path"].endswith("MagnitudePruning"))
    pruning["init_args"]["update_every"] = 2  # the recipe updates masks every 100 steps; this run has 14
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(recipe))
    main([
        "fit", "--config", str(tmp_path / "pipeline.yaml"),
        f"--data.root={tmp_path / 'tree'}", f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.val_size=10", "--data.batch_size=10", "--trainer.log_every_n_steps=1",
        "--trainer.max_epochs=2", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ])
    out = capsys.readouterr().out
    assert "test/acc" in out  # test_after_fit ran on the compressed model
    report = json.loads(next((tmp_path / "runs").rglob("compression_report.json")).read_text())
    assert report["latency"]["compressed_model"] == "int8"  # the report timed the int8 model that left fit
    assert report["totals"]["layer_sparsity"] > 0.85  # pruned zeros survived QAT and int8 conversion
    scalars = read_scalars(tmp_path / "runs")
    for tag in ("sparsity/global", "distill/kd_loss", "val/acc", "test/acc"):
        assert tag in scalars, f"{tag} not logged; logged: {sorted(scalars)}"
    assert scalars["sparsity/global"][-1][1] > 0.85  # 90 % target reached within the run
