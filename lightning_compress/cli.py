"""The ``lightning-compress`` command: LightningCLI over ImageClassifier and CIFARDataModule.

Run a recipe with ``lightning-compress fit --config recipes/quickstart.yaml``; ``validate``,
``test`` and ``predict`` work the same way. Compression callbacks are listed in the recipe under
``trainer.callbacks``; nothing here knows about them.

Example:
    >>> # shell: lightning-compress fit --config recipes/baseline_resnet20.yaml --trainer.max_epochs 1
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_compress.data import CIFARDataModule
from lightning_compress.module import ImageClassifier


class CompressionCLI(LightningCLI):
    """LightningCLI with the model's class count taken from the data and an optional test after fit.

    Adds the top-level option ``test_after_fit`` (default ``false``): when true, ``fit`` ends by
    testing the model *as it left fit* (pruned, int8-converted ...) on the datamodule's test set, so a
    recipe reports the accuracy of the compressed model in one command.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the in-memory (compressed) model on the test set.",
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-compress`` console script.

    ``report``, ``export``, ``sensitivity`` and ``predict --model FILE IMAGES...`` go to
    :mod:`lightning_compress.commands` (plain argparse commands on files); everything else, including
    ``predict`` without ``--model``, is LightningCLI.

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``.
    """
    from lightning_compress import commands

    argv = list(sys.argv[1:] if args is None else args)
    if commands.is_command(argv):
        status = commands.run(argv)
        if status:
            raise SystemExit(status)
        return
    CompressionCLI(
        ImageClassifier,
        CIFARDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
