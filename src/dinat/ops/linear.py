"""Linear layers with their epilogue (GELU, residual add) fused, for inference on CPU.

aten's CPU `addmm` first copies the broadcast bias into the output and then runs the GEMM, and GELU and
the residual add are two more passes over the output. oneDNN's `_linear_pointwise` applies bias, GELU or
the add while the output tile is still in cache (faster at DiNAT's many-token, few-channel shapes; the
same fp32 arithmetic; numbers in docs/performance.md).

The oneDNN call is wrapped in one custom op, `dinat::linear_epilogue`, with a fake (shape-only) version, so
that a compiled graph calls the same kernel as eager (inductor cannot lower the raw oneDNN op without its
own weight prepacking). It has no autograd: it runs only where nothing needs gradients; elsewhere (training,
other devices) these are the plain F.linear / F.gelu / add, which autograd and inductor handle.

On CPUs without bfloat16 dot-product instructions (AVX512-BF16, AMX) oneDNN emulates its bfloat16 GEMM at
about a third of its float32 rate. There a bfloat16 linear runs as the float32 GEMM on bfloat16-rounded
operands: the products are exact in float32 either way and both sum in float32, so the result is the bfloat16
GEMM's, summed in another order, rounded to bfloat16 once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import needs_grad


def _cpu_has_bf16_dot_products() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); True where torch cannot tell."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(check) for check in checks):
        return True
    return any(check() for check in checks)


# read once: torch.compile cannot trace the queries themselves
_ONEDNN = torch.backends.mkldnn.is_available()
_BF16_IN_HARDWARE = _cpu_has_bf16_dot_products()


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


@torch.library.custom_op("dinat::linear_epilogue", mutates_args=())
def _linear_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool,
                     residual: torch.Tensor | None) -> torch.Tensor:
    x, weight = x.contiguous(), weight.contiguous()
    pointwise = torch.ops.mkldnn._linear_pointwise
    if residual is not None:
        return pointwise.binary(x, residual.contiguous(), weight, bias, "add")
    return pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


@_linear_epilogue.register_fake
def _linear_epilogue_fake(x, weight, bias, gelu, residual):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


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
    if dtype == torch.bfloat16 and not _BF16_IN_HARDWARE:
        return _bf16_as_float32(x, weight, bias, gelu, residual)
    bias = None if bias is None else bias.to(dtype)
    return _linear_epilogue(x.to(dtype), weight.to(dtype), bias, gelu, residual)


def _bf16_as_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool,
                     residual: torch.Tensor | None) -> torch.Tensor:
    """The bfloat16 linear computed by the float32 kernel: operands rounded to bfloat16, result rounded once."""
    def rounded(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(torch.bfloat16).float()

    out = _linear_epilogue(rounded(x), rounded(weight), rounded(bias), gelu, rounded(residual))
    return out.to(torch.bfloat16)


__all__ = ["linear"]
