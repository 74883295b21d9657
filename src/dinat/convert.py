"""Convert checkpoints of the original DiNAT code (SHI-Labs/Neighborhood-Attention-Transformer) to this library.

    dinat convert dinat_mini_in1k_224.pth converted/dinat-mini [--variant mini]   (dinat.commands.convert)

The original models use timm naming (`levels.0.blocks.1.attn.qkv.weight`, ...). The output folder has the
layout of the hub checkpoints (`config.json`, `model.safetensors`, `preprocessor_config.json`) and loads
with `DinatForImageClassification.from_pretrained`. Nothing is written unless every key maps; the folder is
written beside the target and swapped in by renames (dinat.atomic), so an interrupted run leaves the old folder
or the new one, complete. An output folder that holds the checkpoint or the working directory is refused.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import atomic
from .configuration_dinat import DinatConfig
from .image_processing_dinat import DinatImageProcessor
from .loading import CheckpointFileError, _pickle_error, check_weights_file
from .modeling_dinat import DinatForImageClassification
from .registry import VARIANTS, variant_for_config, variant_for_original_file

# original name -> this library's name; `qkv` and `gamma1/2` are handled separately (one key becomes three,
# two keys become one)
_RENAMES = [
    (r"patch_embed\.proj\.([01])\.(weight|bias)", r"dinat.embeddings.patch_embeddings.projection.\1.\2"),
    (r"patch_embed\.norm\.(weight|bias)", r"dinat.embeddings.norm.\1"),
    (r"levels\.(\d+)\.blocks\.(\d+)\.norm1\.(weight|bias)", r"dinat.encoder.levels.\1.layers.\2.layernorm_before.\3"),
    (r"levels\.(\d+)\.blocks\.(\d+)\.norm2\.(weight|bias)", r"dinat.encoder.levels.\1.layers.\2.layernorm_after.\3"),
    (r"levels\.(\d+)\.blocks\.(\d+)\.attn\.rpb", r"dinat.encoder.levels.\1.layers.\2.attention.self.rpb"),
    (r"levels\.(\d+)\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"dinat.encoder.levels.\1.layers.\2.attention.output.dense.\3"),
    (r"levels\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"dinat.encoder.levels.\1.layers.\2.intermediate.dense.\3"),
    (r"levels\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"dinat.encoder.levels.\1.layers.\2.output.dense.\3"),
    (r"levels\.(\d+)\.downsample\.reduction\.weight", r"dinat.encoder.levels.\1.downsample.reduction.weight"),
    (r"levels\.(\d+)\.downsample\.norm\.(weight|bias)", r"dinat.encoder.levels.\1.downsample.norm.\2"),
    (r"norm\.(weight|bias)", r"dinat.layernorm.\1"),
    (r"head\.(weight|bias)", r"classifier.\1"),
]
_QKV = re.compile(r"levels\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_GAMMA = re.compile(r"levels\.(\d+)\.blocks\.(\d+)\.gamma([12])")
_BLOCK = re.compile(r"levels\.(\d+)\.blocks\.(\d+)\.")


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says why."""


# -------------------------------------------------------------------------------------------------
# Reading the original checkpoint
# -------------------------------------------------------------------------------------------------
def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an original checkpoint: a bare state dict, or one under `model` / `state_dict`."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"checkpoint {path} is a folder; give the .pth file (for a folder that "
                              "from_pretrained loads there is nothing to convert)")
    if not os.path.lexists(path):
        raise ConversionError(f"checkpoint {path} does not exist")
    try:
        check_weights_file(str(path))  # unreadable, corrupt, or no checkpoint at all: named before unpickling
    except (CheckpointFileError, OSError) as err:
        raise ConversionError(f"cannot read checkpoint: {err}") from None
    try:
        # training checkpoints may carry their argparse options; allow that one class, nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConversionError(f"cannot read checkpoint: {_pickle_error(str(path), err)}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:  # torch's readers on a damaged file
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint: {str(err).splitlines()[0]}") from err
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ConversionError(f"{path} holds no state dict (expected a dict of tensors, possibly under "
                              "'model' or 'state_dict')")
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"{path}: entries that are not tensors: {', '.join(map(str, not_tensors[:10]))}")
    if all(key.startswith("module.") for key in checkpoint):  # saved from DistributedDataParallel
        checkpoint = {key[len("module."):]: value for key, value in checkpoint.items()}
    return checkpoint


# -------------------------------------------------------------------------------------------------
# Architecture from the shapes
# -------------------------------------------------------------------------------------------------
def architecture_from_shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """embed_dim, depths, num_heads, kernel_size, mlp_ratio, layer scale and num_labels of an original state dict."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ConversionError(f"missing key {key!r}: not a checkpoint of the original DiNAT")
        return tuple(state_dict[key].shape)

    embed_dim = shape("patch_embed.proj.1.weight")[0]
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        match = _BLOCK.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ConversionError(f"levels found: {sorted(blocks)}; expected levels 0, 1, ... with blocks")
    depths = [max(blocks[i]) + 1 for i in range(len(blocks))]
    num_heads = [shape(f"levels.{i}.blocks.0.attn.rpb")[0] for i in range(len(depths))]
    rpb_size = shape("levels.0.blocks.0.attn.rpb")[1]
    kernel_size = (rpb_size + 1) // 2  # rpb is (heads, 2K - 1, 2K - 1)
    mlp_ratio = shape("levels.0.blocks.0.mlp.fc1.weight")[0] / embed_dim
    head = state_dict.get("head.weight")
    return dict(embed_dim=embed_dim, depths=depths, num_heads=num_heads, kernel_size=kernel_size,
                mlp_ratio=mlp_ratio, layer_scale="levels.0.blocks.0.gamma1" in state_dict,
                num_labels=0 if head is None else head.shape[0])


def matching_variants(arch: dict[str, Any]) -> list[str]:
    """Registered variants whose shapes are those of `arch` (several when only the dilations differ: large and
    large-384, mini and nat-mini, ...)."""
    names = []
    for name, variant in VARIANTS.items():
        preset = variant.architecture
        if (preset["embed_dim"] == arch["embed_dim"] and list(preset["depths"]) == arch["depths"]
                and list(preset["num_heads"]) == arch["num_heads"]
                and preset.get("kernel_size", 7) == arch["kernel_size"]
                and abs(preset["mlp_ratio"] - arch["mlp_ratio"]) < 1e-6):
            names.append(name)
    return names


def infer_config(state_dict: dict[str, torch.Tensor], variant: str | None = None,
                 file_name: str = "") -> tuple[DinatConfig, str]:
    """The DinatConfig of an original state dict and the variant chosen.

    The shapes give the width, depths, heads and kernel; the dilations come from the variant. When the shapes fit
    several variants, `variant` chooses, else the file name when it is a registered original checkpoint's
    (e.g. dinat_large_in22k_in1k_384.pth), else it is refused.
    """
    arch = architecture_from_shapes(state_dict)
    candidates = matching_variants(arch)
    described = (f"embed_dim={arch['embed_dim']}, depths={arch['depths']}, num_heads={arch['num_heads']}, "
                 f"kernel_size={arch['kernel_size']}, mlp_ratio={arch['mlp_ratio']:g}")
    if variant is not None:
        if variant not in VARIANTS:
            raise ConversionError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if variant not in candidates:
            raise ConversionError(f"the checkpoint's shapes ({described}) are not those of variant {variant!r}"
                                  + (f"; they match {', '.join(candidates)}" if candidates else ""))
        chosen = variant
    elif not candidates:
        raise ConversionError(f"the checkpoint's shapes ({described}) match no DiNAT variant "
                              f"({', '.join(VARIANTS)}); pass --config with a DinatConfig JSON for a custom model")
    elif len(candidates) == 1:
        chosen = candidates[0]
    else:
        named = variant_for_original_file(file_name)
        if named is None or named.name not in candidates:
            raise ConversionError(f"the checkpoint fits several variants ({', '.join(candidates)}), which differ in "
                                  "their dilations; choose one with --variant")
        chosen = named.name
    fields = VARIANTS[chosen].config_fields(num_labels=arch["num_labels"])
    fields["layer_scale_init_value"] = (fields.get("layer_scale_init_value") or 1e-5) if arch["layer_scale"] else 0.0
    return DinatConfig(**fields), chosen


# -------------------------------------------------------------------------------------------------
# Renaming
# -------------------------------------------------------------------------------------------------
def convert_state_dict(original: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original keys -> this library's keys. Returns the new state dict and the keys that map to nothing."""
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    gammas: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in original.items():
        qkv, gamma = _QKV.fullmatch(key), _GAMMA.fullmatch(key)
        if qkv:
            level, block, kind = qkv.groups()
            prefix = f"dinat.encoder.levels.{level}.layers.{block}.attention.self"
            if tensor.shape[0] % 3:
                raise ConversionError(f"{key} has {tensor.shape[0]} rows, not a multiple of 3 (q, k, v)")
            # rows are q, then k, then v (the original reshapes qkv output as (3, heads, head_dim))
            for name, part in zip(("query", "key", "value"), tensor.chunk(3, dim=0)):
                converted[f"{prefix}.{name}.{kind}"] = part.clone()
        elif gamma:
            level, block, which = gamma.groups()
            target = f"dinat.encoder.levels.{level}.layers.{block}.layer_scale_parameters"
            gammas.setdefault(target, {})[int(which)] = tensor
        else:
            for pattern, replacement in _RENAMES:
                if re.fullmatch(pattern, key):
                    converted[re.sub(pattern, replacement, key)] = tensor
                    break
            else:
                unknown.append(key)
    for target, pair in gammas.items():
        if set(pair) != {1, 2}:
            raise ConversionError(f"{target}: the checkpoint has gamma{next(iter(pair))} but not its partner")
        converted[target] = torch.stack([pair[1], pair[2]])  # (2, dim): attention branch, then MLP branch
    return converted, unknown


# -------------------------------------------------------------------------------------------------
# Writing
# -------------------------------------------------------------------------------------------------
def image_processor(config: DinatConfig, image_size: int | None = None) -> DinatImageProcessor:
    """The evaluation transform of the registered variant with `config`'s architecture (timm's ImageNet defaults
    for a custom one), at `image_size` if given."""
    variant = variant_for_config(config)
    overrides = {} if image_size is None else {"size": image_size}
    return DinatImageProcessor.from_variant(variant.pretrained if variant else None, **overrides)


def convert_checkpoint(checkpoint: str | Path, output_dir: str | Path, variant: str | None = None,
                       config: DinatConfig | None = None, image_size: int | None = None,
                       labels: list[str] | None = None, overwrite: bool = False, progress: bool = True) -> DinatConfig:
    """Convert an original DiNAT checkpoint into a folder that `from_pretrained` loads. Returns its config."""
    output_dir = Path(output_dir)
    try:  # before anything is read: the output must not hold the checkpoint or the working directory
        atomic.check_target(output_dir, protect=[checkpoint])
    except atomic.UnsafeTargetError as err:
        raise ConversionError(str(err)) from None
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ConversionError(f"{output_dir} already exists and is not empty; choose another folder or --overwrite")
    # the bar is closed on errors too, so that an error message starts on its own line
    with tqdm(total=5, desc="converting", unit="step", disable=not progress) as steps:
        steps.set_postfix_str("reading")
        original = load_original_state_dict(checkpoint)
        steps.update()

        steps.set_postfix_str("configuring")
        if config is None:
            config, variant = infer_config(original, variant, Path(checkpoint).name)
        if labels is not None:
            if len(labels) != config.num_labels:
                raise ConversionError(f"{len(labels)} labels given but the classifier has {config.num_labels} outputs")
            config.id2label = dict(enumerate(labels))
            config.label2id = {label: i for i, label in enumerate(labels)}
        steps.update()

        steps.set_postfix_str("renaming")
        converted, unknown = convert_state_dict(original)
        with torch.device("meta"):  # shapes only: nothing is allocated for the reference layout
            expected = DinatForImageClassification(config).state_dict()
        missing = sorted(set(expected) - set(converted))
        extra = sorted(set(converted) - set(expected))
        if unknown or missing or extra:
            parts = []
            if unknown:
                parts.append(f"unknown keys ({len(unknown)}): {', '.join(unknown)}")
            if extra:
                parts.append(f"keys this architecture lacks ({len(extra)}): {', '.join(extra)}")
            if missing:
                parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
            raise ConversionError("checkpoint refused, nothing written; " + "; ".join(parts))
        wrong_shapes = [f"{key}: {tuple(converted[key].shape)} instead of {tuple(expected[key].shape)}"
                        for key in expected if converted[key].shape != expected[key].shape]
        if wrong_shapes:
            raise ConversionError("checkpoint refused, nothing written; shapes differ from the variant's: "
                                  + "; ".join(wrong_shapes))
        steps.update()

        steps.set_postfix_str("loading")
        model = DinatForImageClassification(config)
        model.load_state_dict({key: value.float() for key, value in converted.items()}, strict=True)
        steps.update()

        steps.set_postfix_str("writing")
        _write_atomically(output_dir, model, image_processor(config, image_size), protect=[checkpoint])
        steps.update()
    return config


def _write_atomically(output_dir: Path, model, processor, protect=()) -> None:
    """Model and processor written together into a staging folder beside output_dir, then swapped in whole."""
    try:
        atomic.save_together(output_dir, model, processor, protect=protect)
    except atomic.UnsafeTargetError as err:
        raise ConversionError(str(err)) from None


__all__ = ["ConversionError", "convert_checkpoint", "convert_state_dict", "infer_config", "load_original_state_dict"]
