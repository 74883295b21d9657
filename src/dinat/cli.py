"""The `dinat` command: one subcommand per module of dinat.commands.

Errors the user can fix (`CliError`, and the library's ValueError / OSError) are printed as one line on stderr;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from .commands import CliError, bench, convert, info, predict

SUBCOMMANDS = (predict, info, bench, convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinat", description="Dilated Neighborhood Attention Transformer tools")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(subparsers)
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
