"""The ``report``, ``export``, ``predict``, ``sensitivity`` and ``plan`` subcommands of ``lightning-compress``.

They work on files (checkpoints, exported models, images), not on a training run, so they are plain
argparse commands dispatched by :func:`lightning_compress.cli.main` before LightningCLI sees the
arguments. Each ``run(argv)`` returns the process exit status; errors a user can fix (a missing file,
an unreadable checkpoint, a bad directory, a missing optional dependency -- with the pip command that
installs it) print one line naming the file and what was expected, and return 2: never a traceback.

Example:
    >>> run(["report", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = ("report", "export", "predict", "sensitivity", "plan")


def is_command(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for one of :data:`COMMANDS` (``predict`` only in its ``--model`` form).

    ``lightning-compress predict --config ...`` stays LightningCLI's ``predict`` (a datamodule run).

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        True to dispatch to :func:`run`.

    Example:
        >>> is_command(["predict", "--model", "export/", "cat.png"]), is_command(["predict", "--config", "r.yaml"])
        (True, False)
    """
    if not argv or argv[0] not in COMMANDS:
        return False
    if argv[0] == "predict":
        return any(a == "--model" or a.startswith("--model=") for a in argv[1:]) or list(argv[1:]) in (["-h"], ["--help"])
    return True


def run(argv: Sequence[str]) -> int:
    """Run one subcommand.

    Args:
        argv: ``[command, *arguments]``.

    Returns:
        The exit status.
    """
    try:
        from lightning_compress.commands import export, plan, predict, report, sensitivity

        module = {"report": report, "export": export, "predict": predict, "sensitivity": sensitivity,
                  "plan": plan}[argv[0]]
        return module.main(list(argv[1:]))
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ValueError, ImportError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, ImportError) and "pip install" not in message:
            message += " (pip install 'lightning-compress[export]' installs the optional dependencies)"
        print(f"lightning-compress {argv[0]}: error: {message}", file=sys.stderr)
        return 2
