"""`dinat predict` (top-k labels for image files) and `dinat info` (a variant's shape, size and cost).

    dinat predict cat.jpg dog.png --model shi-labs/dinat-mini-in1k-224 --top-k 3
    dinat info shi-labs/dinat-mini-in1k-224      # or a folder, or a preset name: mini, tiny, small, ...

MODEL is a local checkpoint folder or a hub id (resolved through the Hugging Face cache; offline works
when the checkpoint is cached).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

DTYPES = ("float32", "bfloat16")


def add_parser(subparsers) -> None:
    predict = subparsers.add_parser(
        "predict", help="classify images: top-k labels with probabilities",
        description="Classify image files with a DiNAT image-classification checkpoint.")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    predict.add_argument("--model", "-m", required=True, metavar="ID_OR_PATH",
                         help="hub id (e.g. shi-labs/dinat-mini-in1k-224) or local checkpoint folder")
    predict.add_argument("--top-k", "-k", type=int, default=5, metavar="K", help="labels per image (default 5)")
    predict.add_argument("--device", default="cpu", metavar="D", help="torch device, e.g. cpu, cuda, cuda:1")
    predict.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    predict.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass")
    predict.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    predict.set_defaults(func=run_predict)

    info = subparsers.add_parser(
        "info", help="summarize a DiNAT variant: stages, dilations, parameters, GFLOPs",
        description="Summarize a DiNAT checkpoint (hub id or folder) or preset (mini, tiny, small, base, ...).")
    info.add_argument("model", metavar="MODEL", help="hub id, local checkpoint folder, or preset name")
    info.add_argument("--image-size", type=int, nargs="+", metavar="N",
                      help="input height [width] for GFLOPs (default: the processor's input size, else 224)")
    info.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    info.set_defaults(func=run_info)


# -------------------------------------------------------------------------------------------------
# predict
# -------------------------------------------------------------------------------------------------
def run_predict(args: argparse.Namespace) -> int:
    from .cli import CliError

    if args.top_k < 1:
        raise CliError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    for path in args.images:  # fail before loading the model on a missing file or one that is no image at all
        if not os.path.isfile(path):
            raise CliError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
        _check_image_header(path)

    import torch

    device = _device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, processor = load_classifier(args.model, device, dtype)
    results = predict(model, processor, args.images, top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": args.model, "results": results}, indent=2))
    else:
        for result in results:
            print(result["image"])
            for pred in result["predictions"]:
                print(f"  {pred['score']:.4f}  {pred['label']}")
    return 0


def _check_image_header(path: str) -> None:
    """Identify the file's format from its header (cheap); decoding errors surface later, per image."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from .cli import CliError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # reported with the decode
            with Image.open(path):
                pass
    except UnidentifiedImageError:
        raise CliError(f"{path}: not an image file PIL can read") from None
    except Image.DecompressionBombError:
        pass  # reported by the processor with its limit
    except OSError as err:
        raise CliError(f"{path}: cannot read image: {err}") from None


def load_classifier(model_name: str, device=None, dtype=None):
    """(DinatForImageClassification in eval mode, DinatImageProcessor) for a hub id or folder."""
    import torch

    from .image_processing_dinat import DinatImageProcessor
    from .loading import LoadWarning
    from .modeling_dinat import DinatForImageClassification

    _quiet_transformers()
    # what loading warns about (a newly initialized head, cast weights) is shown, not hidden by the quiet logs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = DinatForImageClassification.from_pretrained(model_name, dtype=dtype or torch.float32)
    for warning in caught:
        if issubclass(warning.category, LoadWarning):
            print(f"dinat: warning: {warning.message}", file=sys.stderr)
        else:  # others as Python would have shown them
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not model.config.num_labels or model.config.num_labels < 1:
        from .cli import CliError

        raise CliError(f"{model_name} has no classification head (num_labels = 0)")
    model = model.to(device or "cpu").eval()
    if os.path.isdir(model_name) and not os.path.lexists(os.path.join(model_name, "preprocessor_config.json")):
        # a local folder without preprocessor_config.json: the DiNAT checkpoints' ImageNet defaults
        print(f"dinat: note: {model_name} has no preprocessor_config.json; using 224x224 bicubic resize with "
              "ImageNet mean/std", file=sys.stderr)
        return model, DinatImageProcessor(size=224, resample=3)
    try:
        processor = DinatImageProcessor.from_pretrained(model_name)
    except (OSError, ValueError) as err:  # present but unreadable or corrupt: never silently replaced by defaults
        found = _processor_file(model_name)
        if found is None:
            raise
        from .cli import CliError

        raise CliError(f"{found}: cannot use this preprocessor_config.json (corrupt or unreadable; the "
                       f"defaults could preprocess at the wrong size): {err}") from None
    return model, processor


def _processor_file(model_name: str) -> str | None:
    """The checkpoint's preprocessor_config.json (local, or in the hub cache) if it exists, else None."""
    if os.path.isdir(model_name):
        path = os.path.join(model_name, "preprocessor_config.json")
        return path if os.path.lexists(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_name, "preprocessor_config.json")
    except Exception:  # not a valid hub id: there is no such file
        return None
    return found if isinstance(found, str) else None


def predict(model, processor, images: list, top_k: int = 5, batch_size: int = 8) -> list[dict[str, Any]]:
    """Top-k labels per image: [{"image", "predictions": [{"label", "index", "score"}, ...]}, ...]."""
    import torch

    param = next(model.parameters())
    top_k = min(top_k, model.config.num_labels)
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        try:
            pixel_values = processor(chunk, return_tensors="pt")["pixel_values"]
        except ValueError as err:
            raise ValueError(_name_input(str(err), chunk, start)) from None
        with torch.inference_mode():
            logits = model(pixel_values.to(device=param.device, dtype=param.dtype)).logits
        probs = logits.float().softmax(dim=-1).cpu()
        scores, indices = probs.topk(top_k, dim=-1)
        for image, row_scores, row_indices in zip(chunk, scores.tolist(), indices.tolist()):
            results.append({
                "image": str(image),
                "predictions": [{"label": model.config.id2label.get(i, str(i)), "index": i, "score": s}
                                for s, i in zip(row_scores, row_indices)],
            })
    return results


def _name_input(message: str, chunk: list, start: int) -> str:
    """The processor numbers inputs within a batch; renumber to the command line's order."""
    import re

    match = re.match(r"input (\d+)", message)
    if not match:
        return message
    index = int(match.group(1))
    return message.replace(match.group(0), f"image {start + index + 1}", 1)


def _device(name: str):
    import torch

    from .cli import CliError

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


def _quiet_transformers() -> None:
    """No load reports or progress bars on the command line: errors are reported by the command itself."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


# -------------------------------------------------------------------------------------------------
# info
# -------------------------------------------------------------------------------------------------
def run_info(args: argparse.Namespace) -> int:
    from .cli import CliError

    summary = summarize(args.model, image_size=args.image_size)
    if summary is None:
        raise CliError(f"unknown model {args.model!r}")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"model:       {summary['model']} ({summary['source']})")
    print(f"stages:      {summary['num_stages']}  depths {summary['depths']}  heads {summary['num_heads']}  "
          f"widths {summary['widths']}")
    print(f"kernel:      {summary['kernel_size']}x{summary['kernel_size']}  mlp ratio {summary['mlp_ratio']}")
    for i, dilations in enumerate(summary["dilations"], start=1):
        print(f"dilations:   stage{i} {dilations}" if i == 1 else f"             stage{i} {dilations}")
    print(f"labels:      {summary['num_labels']}")
    print(f"parameters:  {summary['parameters']:,} ({summary['parameters'] / 1e6:.1f} M)")
    height, width = summary["input_size"]
    print(f"GFLOPs:      {summary['gflops']:.2f} at 3x{height}x{width} (multiply-accumulates, as the paper counts)")
    return 0


def summarize(model_name: str, image_size: list[int] | None = None) -> dict[str, Any]:
    """Stages, dilations, parameter count and GFLOPs of a checkpoint (hub id / folder) or a preset name."""
    import torch

    from .configuration_dinat import PRESETS, DinatConfig
    from .modeling_dinat import DinatForImageClassification

    _quiet_transformers()
    processor_size = None
    if model_name in PRESETS and not os.path.exists(model_name):
        config = DinatConfig.from_preset(model_name, num_labels=1000)
        source = "preset, 1000-class head"
        processor_size = (384, 384) if "384" in model_name else (224, 224)
    else:
        from .hub import clear_loading_errors

        with clear_loading_errors(model_name, "model"):
            config = DinatConfig.from_pretrained(model_name)
        source = "checkpoint"
        processor_size = _processor_input_size(model_name)

    if image_size:
        if len(image_size) > 2 or min(image_size) < 1:
            from .cli import CliError

            raise CliError(f"--image-size takes HEIGHT [WIDTH], positive, got {image_size}")
        height, width = image_size[0], image_size[-1]
    else:
        height, width = processor_size or (224, 224)

    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        model = DinatForImageClassification(config)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "model": model_name, "source": source, "num_stages": len(config.depths), "depths": list(config.depths),
        "num_heads": list(config.num_heads), "widths": [config.embed_dim * 2 ** i for i in range(len(config.depths))],
        "kernel_size": config.kernel_size, "mlp_ratio": config.mlp_ratio, "dilations": config.dilations,
        "num_labels": config.num_labels, "parameters": parameters, "input_size": [height, width],
        "gflops": count_macs(config, height, width) / 1e9,
    }


def _processor_input_size(model_name: str) -> tuple[int, int] | None:
    from .image_processing_dinat import DinatImageProcessor

    try:
        return DinatImageProcessor.from_pretrained(model_name).input_size
    except (OSError, ValueError) as err:
        found = _processor_file(model_name)
        if found is None:  # no processor config: the GFLOPs default to 224
            return None
        from .cli import CliError

        raise CliError(f"{found}: cannot use this preprocessor_config.json (corrupt or unreadable): {err}") from None


def count_macs(config, height: int, width: int) -> int:
    """Multiply-accumulates of one forward pass of DinatForImageClassification at (height, width).

    Counts convolutions, linear layers and the two attention products (q.k and attn.v: K*K per query and
    channel), as fvcore does for NAT/DiNAT in the paper; norms, activations and softmax are left out.
    Layers whose map is smaller than the dilated window run attention on the zero-padded map, as the model does.
    """
    def conv_out(n: int) -> int:  # 3x3, stride 2, padding 1
        return (n - 1) // 2 + 1

    dim = config.embed_dim
    h1, w1 = conv_out(height), conv_out(width)
    h, w = conv_out(h1), conv_out(w1)
    macs = h1 * w1 * 9 * config.num_channels * (dim // 2) + h * w * 9 * (dim // 2) * dim
    k2 = config.kernel_size ** 2
    for stage, (depth, dilations) in enumerate(zip(config.depths, config.dilations)):
        hidden = int(config.mlp_ratio * dim)
        for dilation in dilations[:depth]:
            window = config.kernel_size * dilation
            ph, pw = max(h, window), max(w, window)  # padded map for the attention block
            macs += ph * pw * (4 * dim * dim + 2 * dim * k2)  # q, k, v, output projection; q.k and attn.v
            macs += h * w * 2 * dim * hidden  # MLP
        if stage < len(config.depths) - 1:
            h, w = conv_out(h), conv_out(w)
            macs += h * w * 9 * dim * 2 * dim  # downsampler
            dim *= 2
    if config.num_labels > 0:
        macs += dim * config.num_labels
    return macs


__all__ = ["add_parser", "count_macs", "load_classifier", "predict", "summarize"]
