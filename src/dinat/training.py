"""Small pieces every DiNAT fine-tuning loop needs: mixed precision, weight-decay groups, a fresh head.

The model itself carries the rest: drop path (linear over all layers, `config.drop_path_rate`), dropout
(`hidden_dropout_prob`, `attention_probs_dropout_prob`) and gradient checkpointing
(`model.gradient_checkpointing_enable()` or the per-stage `model.set_grad_checkpointing(True, stages=[0, 1])`).
"""

from __future__ import annotations

import contextlib

import torch

from .config_validation import DTYPE_NAMES
from .modeling_dinat import DinatPreTrainedModel

_SHORT_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_TRAINING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 ... -> torch dtype; None means float32."""
    if dtype is None:
        return torch.float32
    name = _SHORT_DTYPE_NAMES.get(dtype.lower(), dtype.lower()) if isinstance(dtype, str) else None
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif name in DTYPE_NAMES:
        resolved = getattr(torch, name)
    else:
        raise ValueError(f"unknown precision {dtype!r}; choose one of float32, bfloat16, float16")
    if resolved not in _TRAINING_DTYPES:
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


def parameter_groups(model: DinatPreTrainedModel, weight_decay: float) -> list[dict]:
    """Two optimizer groups: weights with `weight_decay`; biases, norms, relative position biases and layer scales
    without (`model.no_weight_decay()`). Frozen parameters are left out."""
    return model.parameter_groups(weight_decay)


__all__ = ["autocast", "grad_scaler", "parameter_groups", "resolve_dtype"]
