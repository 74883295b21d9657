"""`dinat bench`: the command line of dinat.bench (DiNAT beside ConvNeXt-T and Swin-T on this machine).

`configure` and `options` are shared with the repository's benchmarks/benchmark.py, which adds developer parts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import bench
from ..bench import MODES, PARTS, PEERS, dinat_contender, format_markdown, run_benchmark


def parse_list(text: str, name: str, allowed=None, kind=str) -> list:
    try:
        values = [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--{name}: could not read {text!r} as a comma-separated list") from None
    if allowed is not None and any(v not in allowed for v in values):
        raise ValueError(f"--{name} must be a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return values


def parse_compile_options(text: str | None, backend: str) -> dict | None:
    """--compile-options as a dict of inductor options, checked before anything compiles: torch.compile ignores
    options silently for other backends, and inductor names an unknown one only at the first call."""
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        raise ValueError(f"--compile-options must be a JSON object of inductor options, got {text!r}")
    if backend != "inductor":
        raise ValueError(f"--compile-options are inductor's options; --compile-backend is {backend!r}")
    import torch._inductor

    unknown = sorted(set(options) - set(torch._inductor.list_options()))
    if unknown:
        raise ValueError(f"--compile-options: not an inductor option: {', '.join(unknown)}")
    return options


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="mini", help="DiNAT preset or DinatConfig file/folder (default: mini)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers from {', '.join(PEERS)} (default: both; '' for none)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the models and compile parts (default 8)")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--backbone-size", type=int, default=1024, help="image side of the backbone part")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per part (default 3)")
    parser.add_argument("--min-run-time", type=float, default=1.0,
                        help="seconds each measurement of a round runs at least (blocked_autorange)")
    parser.add_argument("--compile-modes", default="inference fp32,training step fp32",
                        help=f"modes of the compile part, from: {', '.join(MODES)}")
    parser.add_argument("--compile-peers", action="store_true", help="compile the peers too (slow)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--compile-rounds", type=int, default=bench.COMPILE_ROUNDS,
                        help=f"interleaved rounds of the compile part (default {bench.COMPILE_ROUNDS})")
    parser.add_argument("--compile-options", default=None, metavar="JSON",
                        help="inductor options for the compile part, a JSON object "
                             "(e.g. '{\"reorder_for_peak_memory\": false}')")
    parser.add_argument("--output", type=Path, default=Path("bench-results/bench.json"), help="JSON to write")
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `dinat bench`."""
    parser = subparsers.add_parser("bench", help="DiNAT against ConvNeXt-T and Swin-T on this machine",
                                   description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure(parser)


def options(args: argparse.Namespace) -> dict:
    """The keyword arguments of run_benchmark from parsed options, checked."""
    parts = parse_list(args.parts, "parts", PARTS)
    peers = parse_list(args.peers, "peers", list(PEERS))
    compile_modes = parse_list(args.compile_modes, "compile-modes", MODES)
    if not parts:
        raise ValueError("--parts is empty")
    for name in ("batch", "rounds", "compile_rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size < 32 or args.backbone_size < 32:
        raise ValueError(f"--size and --backbone-size must be >= 32, got {args.size} and {args.backbone_size}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.min_run_time <= 0:
        raise ValueError(f"--min-run-time must be > 0, got {args.min_run_time}")
    compile_options = parse_compile_options(args.compile_options, args.compile_backend)
    dinat_contender(args.model)  # an unknown model fails here, before anything runs
    return dict(model=args.model, peers=peers, parts=parts, batch=args.batch, size=args.size,
                backbone_size=args.backbone_size, threads=args.threads, rounds=args.rounds,
                min_run_time=args.min_run_time, compile_modes=compile_modes, compile_peers=args.compile_peers,
                compile_backend=args.compile_backend, compile_options=compile_options,
                compile_rounds=args.compile_rounds)


def write(results: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")


def run(args: argparse.Namespace) -> int:
    kwargs = options(args)
    results = run_benchmark(**kwargs, progress=lambda text: print(text, file=sys.stderr, flush=True),
                            checkpoint=lambda partial: write(partial, args.output))
    write(results, args.output)
    print(results["compare"])
    print()
    print(format_markdown(results))
    print(f"\nwrote {args.output}")
    return 0
