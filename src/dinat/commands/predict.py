"""`dinat predict`: top-k labels for image files.

    dinat predict cat.jpg dog.png --model shi-labs/dinat-mini-in1k-224 --top-k 3

MODEL is a local checkpoint folder or a hub id (resolved through the Hugging Face cache; offline works when the
checkpoint is cached).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from ..config_validation import DTYPE_NAMES
from ..inference import checkpoint_processor, classify, default_processor, load_classifier
from ..loading import LoadWarning
from . import CliError, quiet_transformers


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify images: top-k labels with probabilities",
        description="Classify image files with a DiNAT image-classification checkpoint.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument("--model", "-m", required=True, metavar="ID_OR_PATH",
                        help="hub id (e.g. shi-labs/dinat-mini-in1k-224) or local checkpoint folder")
    parser.add_argument("--top-k", "-k", type=int, default=5, metavar="K", help="labels per image (default 5)")
    parser.add_argument("--device", default="cpu", metavar="D", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="compute dtype (default float32)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise CliError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = _device(args.device)
    quiet_transformers()
    # what loading warns about (a newly initialized head, cast weights) is shown, not hidden by the quiet logs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_classifier(args.model, device, getattr(torch, args.dtype))
    for warning in caught:
        if issubclass(warning.category, LoadWarning):
            print(f"dinat: warning: {warning.message}", file=sys.stderr)
        else:  # others as Python would have shown them
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    processor = checkpoint_processor(args.model)
    if processor is None:
        processor = default_processor(model.config)
        size = processor.input_size
        print(f"dinat: note: {args.model} has no preprocessor_config.json; using {size[0]}x{size[1]} "
              f"{processor.resample.name.lower()} with crop {processor.crop_pct:g} and ImageNet mean/std",
              file=sys.stderr)
    results = classify(model, processor, args.images, top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": args.model, "results": results}, indent=2))
    else:
        for result in results:
            print(result["image"])
            for prediction in result["predictions"]:
                print(f"  {prediction['score']:.4f}  {prediction['label']}")
    return 0


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"unknown device {name!r}; use e.g. cpu, cuda, cuda:0, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError("device 'mps' requested but MPS is not available; use --device cpu")
    return device
