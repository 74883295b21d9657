"""Neighborhood attention through NATTEN, imported only when this backend runs.

NATTEN >= 0.20: `natten.na2d` (fused; no RPB), heads-last layout (B, H, W, heads, D).
NATTEN <= 0.17: the RPB ops `natten.functional.na2d_qk(q, k, kernel_size, dilation, rpb=...)` and
`na2d_av(attn, v, kernel_size, dilation)`, heads-first layout, as transformers 4.46's DiNAT calls them.
"""

from __future__ import annotations

import importlib

import torch

from .dispatch import natten_version

Pair = tuple[int, int]


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Pair, dilation: Pair,
         rpb: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """(B, heads, H, W, D) in and out, like the other backends."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    version = natten_version()
    if version is not None and version >= (0, 20):
        if rpb is not None:
            raise ValueError("NATTEN >= 0.20 has no relative positional bias; use use_rpb=False")
        natten = importlib.import_module("natten")
        to_heads_last = (0, 2, 3, 1, 4)  # (B, heads, H, W, D) -> (B, H, W, heads, D)
        out = natten.na2d(q.permute(to_heads_last), k.permute(to_heads_last), v.permute(to_heads_last),
                          kernel_size=kernel_size, dilation=dilation, scale=scale)
        return out.permute(0, 3, 1, 2, 4)
    functional = importlib.import_module("natten.functional")
    scores = functional.na2d_qk(q * scale, k, kernel_size, dilation, rpb=rpb)
    weights = scores.softmax(dim=-1).to(v.dtype)
    return functional.na2d_av(weights, v, kernel_size, dilation)


__all__ = ["na2d"]
