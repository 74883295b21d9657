"""`dinat convert`: an original SHI-Labs DiNAT checkpoint (.pth, timm naming) to a from_pretrained folder.

    dinat convert dinat_mini_in1k_224.pth converted/dinat-mini [--variant mini]

The conversion itself is dinat.convert.convert_checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..configuration_dinat import DinatConfig
from ..convert import ConversionError, convert_checkpoint
from ..image_processing_dinat import DinatImageProcessor
from ..registry import VARIANTS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert an original SHI-Labs DiNAT checkpoint (.pth) to a from_pretrained folder",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="original checkpoint (.pth), a state dict possibly under "
                                                      "'model' or 'state_dict'")
    parser.add_argument("output_dir", type=Path, help="folder to create (config.json, model.safetensors, ...)")
    parser.add_argument("--variant", choices=list(VARIANTS), help="DiNAT variant (default: from the shapes)")
    parser.add_argument("--config", type=Path, help="a DinatConfig JSON for a custom architecture "
                                                    "(instead of a variant)")
    parser.add_argument("--image-size", type=int, help="input size for preprocessor_config.json "
                                                       "(default: the variant's, from dinat.registry)")
    parser.add_argument("--labels", type=Path, help="text file with one class name per line")
    parser.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = None
    if args.config is not None:
        if args.variant is not None:
            raise ConversionError("give either --variant or --config, not both")
        try:
            config = DinatConfig.from_json_file(str(args.config))
        except (OSError, json.JSONDecodeError) as err:
            raise ConversionError(f"cannot read config {args.config}: {err}") from err
    labels = None
    if args.labels is not None:
        labels = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]
    if args.image_size is not None and args.image_size < 1:
        raise ConversionError(f"--image-size must be positive, got {args.image_size}")
    config = convert_checkpoint(args.checkpoint, args.output_dir, variant=args.variant, config=config,
                                image_size=args.image_size, labels=labels, overwrite=args.overwrite)
    processor = DinatImageProcessor.from_pretrained(args.output_dir)
    height, width = processor.input_size
    print(f"wrote {args.output_dir} (embed_dim={config.embed_dim}, depths={config.depths}, "
          f"kernel_size={config.kernel_size}, {config.num_labels} classes; input {height}x{width}, "
          f"{processor.resample.name.lower()} resize, crop {processor.crop_pct:g})")
    return 0
