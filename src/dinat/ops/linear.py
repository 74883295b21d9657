"""Linear layers with their epilogue (GELU, residual add) fused, for inference on CPU.

aten's CPU `addmm` first copies the broadcast bias into the output and then runs the GEMM, and GELU and
the residual add are two more passes over the output. oneDNN's `_linear_pointwise` applies bias, GELU or
the add while the output tile is still in cache (faster at DiNAT's many-token, few-channel shapes; the
same fp32 arithmetic; numbers in docs/performance.md).

The oneDNN call is wrapped in one custom op, `dinat::linear_epilogue`, with a fake (shape-only) version, so
that a compiled graph calls the same kernel as eager (inductor cannot lower the raw oneDNN op without its
own weight prepacking); plain eager calls skip the op's dispatch (`plan.calls_kernel_directly`). It has no
autograd: it runs only where nothing needs gradients; elsewhere (training, other devices) these are the plain
F.linear / F.gelu / add, which autograd and inductor handle.

In bfloat16 on CPUs without bfloat16 instructions, the same op runs in float32 on rounded operands (`bfloat16`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import bfloat16
from .plan import calls_kernel_directly, needs_grad


# read once: torch.compile cannot trace the query itself
_ONEDNN = torch.backends.mkldnn.is_available()


def _fused_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype oneDNN computes in, or None where the plain path must run."""
    if x.device.type != "cpu" or not _ONEDNN:
        return None
    if needs_grad(x, weight):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype == torch.bfloat16 and weight.dtype == torch.float32 else None
    return x.dtype if x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16) else None


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool,
                   residual: torch.Tensor | None) -> torch.Tensor:
    x, weight = x.contiguous(), weight.contiguous()
    pointwise = torch.ops.mkldnn._linear_pointwise
    if residual is not None:
        return pointwise.binary(x, residual.contiguous(), weight, bias, "add")
    return pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


@torch.library.custom_op("dinat::linear_epilogue", mutates_args=())
def _linear_epilogue_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool,
                        residual: torch.Tensor | None) -> torch.Tensor:
    return _onednn_linear(x, weight, bias, gelu, residual)


@_linear_epilogue_op.register_fake
def _linear_epilogue_fake(x, weight, bias, gelu, residual):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool,
                     residual: torch.Tensor | None) -> torch.Tensor:
    run = _onednn_linear if calls_kernel_directly(x) else _linear_epilogue_op
    return run(x, weight, bias, gelu, residual)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """`residual + act(x @ weight.T + bias)`, act = exact (erf) GELU if `gelu` else identity.

    Args:
        x: (..., in_features) input.
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        gelu: apply the exact GELU after the bias.
        residual: (..., out_features) added last, or None (not combined with `gelu`).

    Returns:
        (..., out_features), in the dtype F.linear gives (autocast included).
    """
    dtype = _fused_dtype(x, weight)
    if dtype is None or (residual is not None and (residual.dtype != dtype or gelu)):
        out = F.linear(x, weight, bias)
        if gelu:
            out = F.gelu(out)
        return out if residual is None else residual + out
    if bfloat16.runs_as_float32(dtype):
        r = bfloat16.rounded
        return _linear_epilogue(r(x), r(weight), r(bias), gelu, r(residual)).to(torch.bfloat16)
    bias = None if bias is None else bias.to(dtype)
    return _linear_epilogue(x.to(dtype), weight.to(dtype), bias, gelu, residual)


__all__ = ["linear"]
