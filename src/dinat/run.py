"""Run any script with this package's DiNAT registered in transformers' Auto classes.

    python -m dinat.run script.py ARGS...        # as `python script.py ARGS...`
    python -m dinat.run -m package.module ARGS...  # as `python -m package.module ARGS...`
    torchrun --nproc_per_node 2 -m dinat.run script.py ARGS...

A script written for transformers (`AutoConfig`, `AutoModel*`, `AutoBackbone`, `AutoImageProcessor`, `pipeline`)
builds transformers' own DiNAT for `model_type` "dinat" unless this package has registered its classes; that one
stops with "requires the natten library". This runner registers them, then runs the script as `__main__`
with its own argv, as `python` would: `sys.argv[0]` is the script, its folder is first on `sys.path`, and its
exit status is the runner's.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = ("usage: python -m dinat.run script.py [ARGS...]\n"
         "       python -m dinat.run -m module [ARGS...]\n"
         "Runs the script (or module) with dinat's DiNAT classes registered in transformers' Auto classes.")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(2 if not argv else 0)

    if argv[0] == "-m":
        if len(argv) < 2:
            print(f"dinat.run: -m needs a module name\n{USAGE}", file=sys.stderr)
            raise SystemExit(2)
        module, args = argv[1], argv[2:]
        _register()
        sys.argv = [module] + args  # runpy puts the module's file name in sys.argv[0]
        sys.path.insert(0, os.getcwd())  # as `python -m` does
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return

    script, args = argv[0], argv[1:]
    if not os.path.isfile(script):
        print(f"dinat.run: can't open file {script!r}: no such file", file=sys.stderr)
        raise SystemExit(2)
    _register()
    sys.argv = [script] + args
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` does
    runpy.run_path(script, run_name="__main__")


def _register() -> None:
    from .auto import register_with_transformers

    register_with_transformers()


if __name__ == "__main__":
    main()
