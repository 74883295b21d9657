"""bfloat16 linears and convolutions on CPUs without bfloat16 instructions.

oneDNN runs bfloat16 GEMMs and convolutions in hardware where the CPU has AVX512-BF16 or AMX, and emulates them
elsewhere, at about a quarter of its float32 rate (docs/performance.md). There the float32 kernel on
bfloat16-rounded operands gives the bfloat16 result faster: bfloat16 products are exact in float32 and both
paths sum in float32, so only the order of the sums differs, and the result is rounded to bfloat16 once.
"""

from __future__ import annotations

import torch
from torch import nn

from .plan import needs_grad


def _cpu_has_bf16_dot_products() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); True where torch cannot tell."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(check) for check in checks):
        return True
    return any(check() for check in checks)


# read once: torch.compile cannot trace the queries themselves
BF16_IN_HARDWARE = _cpu_has_bf16_dot_products()


def runs_as_float32(dtype: torch.dtype | None) -> bool:
    """Whether a CPU matmul or convolution computing in `dtype` runs as float32 on rounded operands here."""
    return dtype == torch.bfloat16 and not BF16_IN_HARDWARE


def rounded(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` rounded to bfloat16, held in float32 (None stays None)."""
    return None if t is None else t.to(torch.bfloat16).float()


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`; in bfloat16 (autocast or bfloat16 tensors) on a CPU without bfloat16 instructions, where
    nothing needs gradients, computed by the float32 convolution on rounded operands."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu") if conv.weight.dtype in (torch.float32, torch.bfloat16) else None
    else:
        dtype = x.dtype if x.dtype == conv.weight.dtype else None  # a mismatch keeps torch's own error
    if x.device.type != "cpu" or needs_grad(x, conv.weight) or not runs_as_float32(dtype):
        return conv(x)
    with torch.autocast("cpu", enabled=False):
        out = conv._conv_forward(rounded(x), rounded(conv.weight), rounded(conv.bias))
    return out.to(torch.bfloat16)
