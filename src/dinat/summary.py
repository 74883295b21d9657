"""A variant's shape and cost: stages, dilations, parameters, multiply-accumulates, and the input it expects."""

from __future__ import annotations

import os
from typing import Any

import torch

from .configuration_dinat import DinatConfig
from .hub import clear_loading_errors
from .inference import checkpoint_processor
from .modeling_dinat import DinatForImageClassification
from .registry import VARIANTS, PretrainedCfg, variant_for_config


def summarize(model_name: str, image_size: list[int] | None = None) -> dict[str, Any]:
    """Stages, dilations, parameter count, GFLOPs and input (size, crop, interpolation) of a registered variant
    (a preset name such as "large-384") or a checkpoint (hub id or folder).

    The input comes from the checkpoint's processor, else from the registry entry with the same architecture,
    else timm's ImageNet defaults (224x224); GFLOPs are counted at `image_size` (height [width]) if given."""
    if model_name in VARIANTS and not os.path.exists(model_name):
        variant = VARIANTS[model_name]
        config = DinatConfig(**variant.config_fields(num_labels=variant.pretrained.num_classes))
        source, data = f"preset, {variant.pretrained.num_classes}-class head", _data_config(variant.pretrained)
    else:
        with clear_loading_errors(model_name, "model"):
            config = DinatConfig.from_pretrained(model_name)
        variant = variant_for_config(config)
        processor = checkpoint_processor(model_name)
        source = "checkpoint"
        if processor is not None:
            data = {"input_size": processor.input_size, "crop_pct": processor.crop_pct,
                    "interpolation": processor.resample.name.lower()}
        else:
            data = _data_config(variant.pretrained if variant else PretrainedCfg())

    if image_size:
        if len(image_size) > 2 or min(image_size) < 1:
            raise ValueError(f"image size takes HEIGHT [WIDTH], positive, got {image_size}")
        height, width = image_size[0], image_size[-1]
    else:
        height, width = data["input_size"] or (224, 224)  # None: a processor whose output size depends on the image

    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        model = DinatForImageClassification(config)
    return {
        "model": model_name, "source": source, "variant": variant.name if variant else None,
        "num_stages": len(config.depths), "depths": list(config.depths), "num_heads": list(config.num_heads),
        "widths": list(config.stage_widths),
        "kernel_size": config.kernel_size, "mlp_ratio": config.mlp_ratio, "dilations": config.dilations,
        "num_labels": config.num_labels, "parameters": sum(p.numel() for p in model.parameters()),
        "input_size": [height, width], "crop_pct": data["crop_pct"], "interpolation": data["interpolation"],
        "gflops": count_macs(config, height, width) / 1e9,
    }


def _data_config(pretrained: PretrainedCfg) -> dict[str, Any]:
    return {"input_size": pretrained.input_size, "crop_pct": pretrained.crop_pct,
            "interpolation": pretrained.interpolation}


def count_macs(config: DinatConfig, height: int, width: int) -> int:
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


__all__ = ["count_macs", "summarize"]
