"""The distillation recipes parse with the real CLI and build a working KnowledgeDistillation."""

from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_compress.cli import CompressionCLI
from lightning_compress.data import CIFARDataModule
from lightning_compress.distillation import KnowledgeDistillation
from lightning_compress.module import ImageClassifier

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("recipe", ["resnet20_kd.yaml", "mobilenetv2_kd.yaml"])
def test_kd_recipe_builds_callback_from_teacher_recipe_path(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher_path = tmp_path / "checkpoints" / "resnet56_teacher" / "best.ckpt"  # resnet56_teacher.yaml's output
    teacher_path.parent.mkdir(parents=True)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(ImageClassifier("resnet56"))
    trainer.save_checkpoint(teacher_path)

    cli = CompressionCLI(ImageClassifier, CIFARDataModule, run=False, auto_configure_optimizers=False,
                         args=["--config", str(RECIPES / recipe), "--trainer.logger", "false"])
    kd = [cb for cb in cli.trainer.callbacks if isinstance(cb, KnowledgeDistillation)]
    assert len(kd) == 1 and kd[0].temperature == 4.0 and kd[0].alpha == 0.9
    assert isinstance(kd[0].teacher.module, ImageClassifier) and kd[0].teacher.module.hparams.model == "resnet56"


def test_teacher_recipe_writes_the_path_the_kd_recipes_read():
    teacher = (RECIPES / "resnet56_teacher.yaml").read_text()
    assert "dirpath: checkpoints/resnet56_teacher" in teacher and "filename: best" in teacher
    for recipe in ("resnet20_kd.yaml", "mobilenetv2_kd.yaml"):
        assert "teacher: checkpoints/resnet56_teacher/best.ckpt" in (RECIPES / recipe).read_text()
