"""LayerNorm over the last dimension, for inference on CPU: the C++ extension's row kernel where it applies.

aten's CPU LayerNorm costs about three times a copy of the tensor on DiNAT's many short rows (64-512 channels);
the extension's kernel (`csrc/layer_norm_cpu.cpp`, built with the attention kernel) normalizes each row in L1
with the same float32 arithmetic. It runs only where nothing needs gradients, on float32 CPU tensors whose
channels are a multiple of 16, outside torch.compile (inductor fuses LayerNorm with its neighbours itself);
everything else is `F.layer_norm`. Numbers in docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpp_backend
from .plan import is_exporting


@torch.library.custom_op("dinat::layer_norm_rows", mutates_args=())
def _layer_norm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return cpp_backend.extension().layer_norm(x.contiguous(), weight.contiguous(), bias.contiguous(), eps)


@_layer_norm_rows.register_fake
def _layer_norm_rows_fake(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    if weight is None or bias is None or torch.compiler.is_compiling() or is_exporting():
        return False
    if x.device.type != "cpu" or not all(t.dtype == torch.float32 for t in (x, weight, bias)):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias)):
        return False
    if cpp_backend.unavailable_reason() is not None:
        return False
    return cpp_backend.extension().layer_norm_supported(x.shape[-1])


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`F.layer_norm(x, (x.shape[-1],), weight, bias, eps)`, on the C++ row kernel where it applies.

    Args:
        x: (..., channels) input.
        weight: (channels,) scale, or None.
        bias: (channels,) shift, or None.
        eps: added to the variance.

    Returns:
        x normalized over its last dimension, in x's dtype and shape (contiguous).
    """
    if _kernel_applies(x, weight, bias):
        return _layer_norm_rows(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


__all__ = ["layer_norm"]
