"""The lightning-compress command: every recipe parses and instantiates; a real fit runs end to end."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from lightning_compress.cli import CompressionCLI, main
from lightning_compress.data import CIFARDataModule
from lightning_compress.module import ImageClassifier

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.fixture
def teacher_checkpoint(tmp_path):
    """The checkpoint recipes/resnet56_teacher.yaml writes, which the distillation recipes read."""
    path = tmp_path / "checkpoints" / "resnet56_teacher" / "best.ckpt"
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(ImageClassifier("resnet56"))
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses_and_instantiates(recipe, tmp_path, monkeypatch, teacher_checkpoint):
    monkeypatch.chdir(tmp_path)  # recipes use paths relative to the working directory
    cli = CompressionCLI(
        ImageClassifier, CIFARDataModule, run=False,
        args=["--config", str(recipe), f"--trainer.default_root_dir={tmp_path}"],
    )
    assert isinstance(cli.model, ImageClassifier)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes
    assert cli.trainer.max_epochs or cli.trainer.max_steps
    assert cli.datamodule.hparams.root == "../shared/data/cifar10-jpeg.tar.gz"  # the offline CIFAR-10 copy


def write_image_folder(root: Path, classes: int = 10, per_class: int = 4) -> None:
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def test_fit_then_test_from_the_command_line(tmp_path, capsys):
    write_image_folder(tmp_path / "tree")
    main([
        "fit", "--config", str(Path(__file__).parents[1] / "recipes" / "baseline_resnet20.yaml"),
        f"--data.root={tmp_path / 'tree'}", f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.val_size=8", "--data.batch_size=8",
        "--trainer.max_epochs=1", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ])
    out = capsys.readouterr().out
    assert "test/acc" in out  # test_after_fit ran on the model that left fit
    assert list((tmp_path / "runs").rglob("*.ckpt")), "ModelCheckpoint wrote no checkpoint"


def test_help_lists_the_file_commands_and_an_unknown_command_is_one_line_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for command in ("fit", "report CKPT", "export CKPT --to DIR", "predict --model DIR IMAGES", "sensitivity CKPT",
                    "plan CKPT"):
        assert command in out, command
    with pytest.raises(SystemExit) as exit_:
        main(["expotr", "run.ckpt"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == ("lightning-compress: error: unknown command 'expotr'; choose from fit, validate, test, predict, "
                   "report, export, sensitivity, plan (predict --model DIR IMAGES for an exported model)\n")


@pytest.mark.parametrize("argv", [
    [],
    ["fit", "--trainer.max_epochs", "abc"],
    ["fit", "--no_such_option", "1"],
    ["fit", "--config", "no-such-recipe.yaml"],
    ["report"],
    ["export", "run.ckpt"],
    ["predict", "--model"],
    ["sensitivity", "run.ckpt"],
    ["plan", "run.ckpt", "--data-root", "data", "--threads", "two"],
], ids=lambda argv: " ".join(argv) or "no command")
def test_a_usage_error_is_one_line_naming_the_command_with_exit_code_2(capsys, argv):
    """LightningCLI's and argparse's usage blocks (78 lines for ``fit``) are left out: the error and where the
    options are listed."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    command = " ".join(["lightning-compress", *argv[:1]])
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"{command}: error: ") and err.endswith(f" (see {command} --help)\n"), err
