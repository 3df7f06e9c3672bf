"""recipes/resnet20_lowrank.yaml parses with the real CLI and builds the documented LowRankFactorization."""

from pathlib import Path

from lightning_compress import LowRankFactorization
from lightning_compress.cli import CompressionCLI
from lightning_compress.data import CIFARDataModule
from lightning_compress.module import ImageClassifier

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "resnet20_lowrank.yaml"


def test_lowrank_recipe_builds_the_factorization():
    cli = CompressionCLI(ImageClassifier, CIFARDataModule, run=False, auto_configure_optimizers=False,
                         args=["--config", str(RECIPE), "--trainer.logger", "false"])
    (factorization,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LowRankFactorization)]
    assert factorization.target == ("kept_macs_ratio", 0.333)
    assert (factorization.method, factorization.start, factorization.round_to) == ("tucker2", 0.5, 8)
    assert cli.model.hparams.model == "resnet20" and cli.trainer.max_epochs == 160
