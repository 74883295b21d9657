"""Small pieces every DiNAT fine-tuning loop needs: mixed precision, weight-decay groups, a fresh head.

The model itself carries the rest: drop path (linear over all layers, `config.drop_path_rate`), dropout
(`hidden_dropout_prob`, `attention_probs_dropout_prob`) and gradient checkpointing
(`model.gradient_checkpointing_enable()` or the per-stage `model.set_grad_checkpointing(True, stages=[0, 1])`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .modeling_dinat import DinatLayer, NeighborhoodAttention

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 ... -> torch dtype; None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        resolved = _DTYPES[dtype.lower()]
    else:
        raise ValueError(f"unknown precision {dtype!r}; choose one of float32, bfloat16, float16")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported precision {resolved}; choose one of float32, bfloat16, float16")
    return resolved


def autocast(device: str | torch.device, dtype: str | torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass: bfloat16 on CPU or GPU, float16 on GPU; float32 means none.

    float16 on CPU is refused: CPU kernels gain nothing from it and it needs loss scaling to train.
    """
    device_type = torch.device(device).type
    dtype = resolve_dtype(dtype)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype == torch.float16 and device_type != "cuda":
        raise ValueError(f"float16 autocast needs a CUDA device (got {device_type}); use bfloat16 on CPU")
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(device: str | torch.device, dtype: str | torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, enabled only where it is needed (float16 on GPU); a no-op otherwise."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=resolve_dtype(dtype) == torch.float16)


def _no_decay_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Biases, norm weights, relative position biases and layer scales: decaying them only hurts."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if (name == "bias" or isinstance(module, nn.LayerNorm)
                    or (isinstance(module, NeighborhoodAttention) and name == "rpb")
                    or (isinstance(module, DinatLayer) and name == "layer_scale_parameters")):
                yield param


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: weights with `weight_decay`, the rest (see above) without. Frozen params are left out."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    no_decay = {id(p) for p in _no_decay_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0},
    ]


__all__ = ["autocast", "grad_scaler", "parameter_groups", "resolve_dtype"]
