"""`dinat info`: a variant's stages, dilations, parameters, GFLOPs and input.

    dinat info shi-labs/dinat-mini-in1k-224      # or a folder, or a preset name: mini, tiny, ..., large-384
"""

from __future__ import annotations

import argparse
import json

from ..summary import summarize
from . import quiet_transformers


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="summarize a DiNAT variant: stages, dilations, parameters, GFLOPs",
        description="Summarize a DiNAT checkpoint (hub id or folder) or preset (mini, tiny, small, base, ...).")
    parser.add_argument("model", metavar="MODEL", help="hub id, local checkpoint folder, or preset name")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="N",
                        help="input height [width] for GFLOPs (default: the variant's input size)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_transformers()
    summary = summarize(args.model, image_size=args.image_size)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    variant = f", variant {summary['variant']}" if summary["variant"] else ""
    print(f"model:       {summary['model']} ({summary['source']}{variant})")
    print(f"stages:      {summary['num_stages']}  depths {summary['depths']}  heads {summary['num_heads']}  "
          f"widths {summary['widths']}")
    print(f"kernel:      {summary['kernel_size']}x{summary['kernel_size']}  mlp ratio {summary['mlp_ratio']}")
    for i, dilations in enumerate(summary["dilations"], start=1):
        print(f"dilations:   stage{i} {dilations}" if i == 1 else f"             stage{i} {dilations}")
    print(f"labels:      {summary['num_labels']}")
    print(f"parameters:  {summary['parameters']:,} ({summary['parameters'] / 1e6:.1f} M)")
    height, width = summary["input_size"]
    crop = "no crop" if summary["crop_pct"] is None else f"crop {summary['crop_pct']:g}"
    print(f"preprocess:  {summary['interpolation']} resize, {crop}")
    print(f"GFLOPs:      {summary['gflops']:.2f} at 3x{height}x{width} (multiply-accumulates, as the paper counts)")
    return 0
