"""Command-line usage errors as one line: what was wrong, and where the options are listed.

``argparse`` and LightningCLI's parser print their whole usage block before the error (dozens of lines for
``fit``); the commands print only the line that says what to fix.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


def usage_error_line(prog: str, message: str) -> str:
    """The one line a usage error prints: ``"<prog>: error: <message> (see <prog> --help)"``.

    Args:
        prog: The command, as its usage names it (``"lightning-compress plan"``).
        message: The parser's message; its line breaks and indentation become single spaces.

    Returns:
        The line, ending in a newline.

    Example:
        >>> usage_error_line("lightning-compress plan", "the following arguments are required:\\n  --data-root")
        'lightning-compress plan: error: the following arguments are required: --data-root (see lightning-compress plan --help)\\n'
    """
    return f"{prog}: error: {' '.join(message.split())} (see {prog} --help)\n"


class CommandParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose usage errors are one line (:func:`usage_error_line`) and exit code 2.

    Example:
        >>> parser = CommandParser(prog="lightning-compress plan")
        >>> _ = parser.add_argument("--threads", type=int)
        >>> parser.parse_args(["--threads", "two"])
        Traceback (most recent call last):
        SystemExit: 2
    """

    def error(self, message: str) -> NoReturn:
        """Print :func:`usage_error_line` to stderr and exit with status 2."""
        self.exit(2, usage_error_line(self.prog, message))
