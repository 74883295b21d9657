"""Linear layers with their epilogue (GELU, residual add) fused, for inference on CPU.

aten's CPU `addmm` first copies the broadcast bias into the output and then runs the GEMM, and GELU and
the residual add are two more passes over the output. oneDNN's `_linear_pointwise` applies bias, GELU or
the add while the output tile is still in cache (faster at DiNAT's many-token, few-channel shapes; the
same fp32 arithmetic; numbers in docs/performance.md).

The oneDNN call is wrapped in one op, `dinat::linear_epilogue`, with a fake (shape-only) version, so that a
compiled graph calls the same kernel as eager (inductor cannot lower the raw oneDNN op without its own weight
prepacking). Its CPU kernel is C++, registered by the extension of `cpp_backend` (csrc/bindings.cpp), so that
neither eager code nor a compiled graph goes through a Python frame to reach oneDNN; where the extension is not
built, these are the plain ops. It has no autograd: it runs only where nothing needs gradients; elsewhere
(training, other devices) these are the plain F.linear / F.gelu / add, which autograd and inductor handle.

In bfloat16 on CPUs without bfloat16 instructions, the same op runs in float32 on rounded operands (`bfloat16`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import bfloat16, cpp_backend
from .plan import needs_grad


# read once: torch.compile cannot trace the query itself
_ONEDNN = torch.backends.mkldnn.is_available()

torch.library.define("dinat::linear_epilogue",
                     "(Tensor x, Tensor weight, Tensor? bias, bool gelu, Tensor? residual) -> Tensor")


@torch.library.register_fake("dinat::linear_epilogue")
def _linear_epilogue_fake(x, weight, bias, gelu, residual):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fused_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype oneDNN computes in, or None where the plain path must run."""
    if x.device.type != "cpu" or not _ONEDNN or cpp_backend.unavailable_reason() is not None:
        return None
    if needs_grad(x, weight):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype == torch.bfloat16 and weight.dtype == torch.float32 else None
    return x.dtype if x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16) else None


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
        return torch.ops.dinat.linear_epilogue(r(x), r(weight), r(bias), gelu, r(residual)).to(torch.bfloat16)
    bias = None if bias is None else bias.to(dtype)
    return torch.ops.dinat.linear_epilogue(x.to(dtype), weight.to(dtype), bias, gelu, residual)


__all__ = ["linear"]
