"""LayerNorm over the last dimension, with the kernel that is fastest on CPU for each kind of call.

- Inference: aten's CPU LayerNorm costs about three times a copy of the tensor on DiNAT's many short rows
  (64-512 channels); the extension's kernel (`csrc/layer_norm_cpu.cpp`, built with the attention kernel)
  normalizes each row in L1 with the same float32 arithmetic. It runs where nothing needs gradients, on CPU
  tensors whose channels are a multiple of 16, float32, or bfloat16 with float32 weight and bias (autocast:
  computed in float32 and rounded once, as aten does), in compiled graphs too: there the norms sit between opaque
  custom ops (the linears, attention) that inductor cannot fuse them with, and its own LayerNorm is 2-2.7x
  slower per call on DiNAT's shapes. The op, `dinat::layer_norm_rows`, has its C++ kernel registered with torch's
  dispatcher by the extension: no Python frame between a graph (or eager code) and the kernel.
- Compiled training on CPU: inductor's generated LayerNorm backward (its weight and bias gradients reduce over
  tens of thousands of rows) is several times slower than aten's, so there the norm is one opaque custom op,
  `dinat::layer_norm_train`, whose forward and backward are aten's kernels.
- Everything else (eager training, other devices, other dtypes, export) is `F.layer_norm`.
Numbers in docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpp_backend
from .plan import is_exporting, needs_grad

# its C++ CPU kernel is registered by the extension (csrc/bindings.cpp)
torch.library.define("dinat::layer_norm_rows", "(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor")


@torch.library.register_fake("dinat::layer_norm_rows")
def _layer_norm_rows_fake(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.compiler.assume_constant_result
def _kernel_channel_multiple() -> int:
    """The row kernel runs rows of a positive multiple of this many channels; 0 where it cannot run (not built,
    no AVX-512). A constant to torch.compile, so that a symbolic width (dynamic shapes) is checked by a guard."""
    return 0 if cpp_backend.unavailable_reason() is not None else cpp_backend.extension().layer_norm_channel_multiple()


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    if weight is None or bias is None or is_exporting():
        return False
    # bfloat16 rows with float32 weight and bias (autocast's LayerNorm): aten's mixed-dtype kernel, bfloat16 out
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if weight.dtype != torch.float32 or bias.dtype != torch.float32:
        return False
    if needs_grad(x, weight, bias):
        return False
    multiple = _kernel_channel_multiple()
    return multiple > 0 and x.shape[-1] > 0 and x.shape[-1] % multiple == 0


@torch.library.custom_op("dinat::layer_norm_train", mutates_args=())
def _layer_norm_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalized x, mean, 1 / std) with the statistics as (..., 1), as aten's native_layer_norm returns them."""
    return torch.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)  # contiguous output for any x


@_layer_norm_train.register_fake
def _layer_norm_train_fake(x, weight, bias, eps):
    statistics = x.new_empty(*x.shape[:-1], 1)
    return torch.empty_like(x, memory_format=torch.contiguous_format), statistics, torch.empty_like(statistics)


@torch.library.custom_op("dinat::layer_norm_train_backward", mutates_args=())
def _layer_norm_train_backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                               weight: torch.Tensor,
                               bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # aten makes grad and x contiguous itself, once
    return torch.ops.aten.native_layer_norm_backward(grad, x, [x.shape[-1]], mean, rstd, weight, bias,
                                                     [True, True, True])


@_layer_norm_train_backward.register_fake
def _layer_norm_train_backward_fake(grad, x, mean, rstd, weight, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), torch.empty_like(bias)


def _save_for_backward(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    return *_layer_norm_train_backward(grad, *ctx.saved_tensors), None


_layer_norm_train.register_autograd(_backward, setup_context=_save_for_backward)


def _opaque_in_compiled_training(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    if weight is None or bias is None or not torch.compiler.is_compiling() or is_exporting():
        return False
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or not x.dtype.is_floating_point:
        return False
    if weight.dtype != x.dtype or bias.dtype != x.dtype:  # mixed dtypes: aten's statistics are float32 then
        return False
    return needs_grad(x, weight, bias)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`F.layer_norm(x, (x.shape[-1],), weight, bias, eps)`, on the fastest CPU kernel for the call.

    The C++ row kernel in float32 and bfloat16 inference, eager or compiled (channels a multiple of 16, AVX-512), one
    opaque op on aten's kernels in compiled training, `F.layer_norm` everywhere else.

    Args:
        x: (..., channels) input.
        weight: (channels,) scale, or None.
        bias: (channels,) shift, or None.
        eps: added to the variance.

    Returns:
        x normalized over its last dimension, in x's dtype and shape (contiguous).
    """
    if _kernel_applies(x, weight, bias):
        return torch.ops.dinat.layer_norm_rows(x, weight, bias, eps)
    if _opaque_in_compiled_training(x, weight, bias):
        return _layer_norm_train(x, weight, bias, eps)[0]
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


__all__ = ["layer_norm"]
