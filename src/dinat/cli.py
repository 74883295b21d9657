"""The `dinat` command. Each subcommand lives in its own module and registers itself here.

A subcommand module exposes `add_parser(subparsers)`, which adds its parser and sets `func` (a callable
taking the parsed args and returning an exit code). Errors the user can fix are raised as `CliError`
and printed as one line on stderr; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module names under dinat. that provide subcommands; a module that is absent is skipped
SUBCOMMAND_MODULES = ("commands_predict", "bench", "convert")


class CliError(Exception):
    """An error with a message meant for the user (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinat", description="Dilated Neighborhood Attention Transformer tools")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"dinat.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"dinat.{name}":
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dinat: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line unless --debug
        if args.debug:
            raise
        message = str(err) if isinstance(err, (CliError, ValueError, OSError)) else f"{type(err).__name__}: {err}"
        print(f"dinat {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
