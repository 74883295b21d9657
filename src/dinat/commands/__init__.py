"""The `dinat` command's subcommands, one module each, on top of the library.

Each module exposes `add_parser(subparsers)`, which adds its parser and sets `func` (a callable taking the parsed
args and returning an exit code). Errors the user can fix are raised as `CliError` (or the library's ValueError /
OSError) and printed by `dinat.cli` as one line.
"""

from __future__ import annotations

from transformers.utils import logging


class CliError(Exception):
    """An error with a message meant for the user (no traceback)."""


def quiet_transformers() -> None:
    """No load reports or progress bars on the command line: the command reports errors itself."""
    logging.set_verbosity_error()
    logging.disable_progress_bar()


__all__ = ["CliError", "quiet_transformers"]
