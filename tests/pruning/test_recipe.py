"""recipes/resnet20_gmp90.yaml parses with the real CLI and builds the documented MagnitudePruning."""

from pathlib import Path

from lightning_compress.cli import CompressionCLI
from lightning_compress.data import CIFARDataModule
from lightning_compress.module import ImageClassifier
from lightning_compress.pruning import MagnitudePruning, cubic_sparsity

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "resnet20_gmp90.yaml"


def test_gmp90_recipe_builds_magnitude_pruning():
    cli = CompressionCLI(ImageClassifier, CIFARDataModule, run=False, auto_configure_optimizers=False,
                         args=["--config", str(RECIPE), "--trainer.logger", "false"])
    pruning = [cb for cb in cli.trainer.callbacks if isinstance(cb, MagnitudePruning)]
    assert len(pruning) == 1
    gmp = pruning[0]
    settings = (gmp.final_sparsity, gmp.scope, gmp.pattern, gmp.update_every)
    assert settings == (0.9, "global", "unstructured", 100)
    assert (gmp.start, gmp.end, gmp.histogram_every) == (0.05, 0.65, 1000) and gmp.schedule is cubic_sparsity
    assert cli.model.hparams.model == "resnet20" and cli.trainer.max_epochs == 160
