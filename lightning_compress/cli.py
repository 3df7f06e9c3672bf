"""The ``lightning-compress`` command: LightningCLI over ImageClassifier and CIFARDataModule.

Run a recipe with ``lightning-compress fit --config recipes/quickstart.yaml``; compression callbacks
are listed in it under ``trainer.callbacks``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_compress.commands.parser import usage_error_line
from lightning_compress.data import CIFARDataModule
from lightning_compress.module import ImageClassifier


FILE_COMMANDS = (
    "Commands on files (each with --help): report CKPT (per-layer sparsity, bits and MACs, sizes, latency), "
    "export CKPT --to DIR (an artifact per runtime, checked and timed), predict --model DIR IMAGES (classify images "
    "with an export), sensitivity CKPT (accuracy per layer and sparsity, per-layer pruning targets), plan CKPT (a "
    "per-layer plan for a latency, size or MACs target)."
)


class OneLineErrorParser(LightningArgumentParser):
    """LightningCLI's parser, its usage errors one line (:func:`~lightning_compress.commands.parser.usage_error_line`)
    with exit code 2 instead of the whole usage block."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a parse jsonargparse tries and catches (subcommands, union types)
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        self.exit(2, usage_error_line(prog, message))


class CompressionCLI(LightningCLI):
    """LightningCLI with the model's class count taken from the data, and ``--test_after_fit``.

    ``test_after_fit: true`` tests the model as it left fit (pruned, int8-converted ...) on the test set.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the in-memory (compressed) model on the test set.",
        )

    @override
    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-compress`` console script (``args``: ``None`` reads ``sys.argv``).

    File commands (``report``, ``export``, ``sensitivity``, ``plan``, ``predict --model``) go to
    :mod:`lightning_compress.commands`; everything else to LightningCLI.
    """
    from lightning_compress import commands

    argv = list(sys.argv[1:] if args is None else args)
    if commands.is_command(argv):
        status = commands.run(argv)
        if status:
            raise SystemExit(status)
        return
    known = (*CompressionCLI.subcommands(), *(c for c in commands.COMMANDS if c != "predict"))
    if argv and not argv[0].startswith("-") and argv[0] not in known:
        print(f"lightning-compress: error: unknown command {argv[0]!r}; choose from {', '.join(known)} "
              "(predict --model DIR IMAGES for an exported model)", file=sys.stderr)
        raise SystemExit(2)
    CompressionCLI(
        ImageClassifier,
        CIFARDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "lightning-compress", "epilog": FILE_COMMANDS},
        parser_class=OneLineErrorParser,
    )


if __name__ == "__main__":
    main()
