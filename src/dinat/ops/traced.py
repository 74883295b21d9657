"""The fused op in plain differentiable ops, for torch.export (and ONNX through it).

Same plan as the eager kernel (`plan.plan_call`: classes of dilation groups, query tiles, key halos, one
bias index), written with gathers, pads and matmuls only: no custom op, no autograd Function, no loop over
batch chunks (which would fix the batch size), no in-place softmax. Exact, and slower in eager.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import AxisPlan, GroupClass, halo_positions, plan_call, tile_bias, tile_pair

Pair = tuple[int, int]


def _positions(group: GroupClass, device) -> torch.Tensor:
    """(length, n_groups) positions of a class of dilation groups along its axis."""
    return (group.offset + torch.arange(group.length, device=device)[:, None] * group.dilation
            + torch.arange(group.n_groups, device=device))


def _tiles(x: torch.Tensor, plan_h: AxisPlan, plan_w: AxisPlan) -> torch.Tensor:
    """(..., Lh, Lw, D) -> (..., nTh, nTw, Th*Tw, D), queries padded at the end."""
    x = F.pad(x, (0, 0, 0, plan_w.padded_queries - plan_w.length, 0, plan_h.padded_queries - plan_h.length))
    *lead, _, _, dim = x.shape
    x = x.reshape(*lead, plan_h.n_tiles, plan_h.tile, plan_w.n_tiles, plan_w.tile, dim).transpose(-4, -3)
    return x.reshape(*lead, plan_h.n_tiles, plan_w.n_tiles, plan_h.tile * plan_w.tile, dim)


def _untiles(x: torch.Tensor, plan_h: AxisPlan, plan_w: AxisPlan) -> torch.Tensor:
    *lead, _, _, _, dim = x.shape
    x = x.reshape(*lead, plan_h.n_tiles, plan_w.n_tiles, plan_h.tile, plan_w.tile, dim).transpose(-4, -3)
    x = x.reshape(*lead, plan_h.padded_queries, plan_w.padded_queries, dim)
    return x[..., :plan_h.length, :plan_w.length, :]


def _halos(x: torch.Tensor, plan_h: AxisPlan, plan_w: AxisPlan) -> torch.Tensor:
    """(..., Lh, Lw, D) -> (..., nTh, nTw, Hh*Hw, D): the keys (or values) each tile sees."""
    x = F.pad(x, (0, 0, plan_w.pad_before, plan_w.pad_after, plan_h.pad_before, plan_h.pad_after))
    rows, cols = halo_positions(plan_h).to(x.device), halo_positions(plan_w).to(x.device)
    x = x[..., rows[:, :, None, None], cols[None, None, :, :], :]  # (..., nTh, Hh, nTw, Hw, D)
    x = x.transpose(-4, -3)
    return x.reshape(*x.shape[:-3], plan_h.halo * plan_w.halo, x.shape[-1])


def _attend(q, k, v, rpb, plan_h: AxisPlan, plan_w: AxisPlan, scale: float) -> torch.Tensor:
    """Undilated NA on (B, heads, gh, gw, Lh, Lw, D) maps (each dilation group an ordinary map)."""
    heads = q.shape[1]
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    bias = tile_bias(rpb, heads, plan_h, plan_w, q.device, compute_dtype)[None, :, None, None]
    scores = torch.matmul(_tiles(q, plan_h, plan_w) * scale, _halos(k, plan_h, plan_w).transpose(-1, -2))
    weights = (scores.to(compute_dtype) + bias).softmax(dim=-1).to(v.dtype)
    return _untiles(torch.matmul(weights, _halos(v, plan_h, plan_w)), plan_h, plan_w)


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Pair, dilation: Pair,
         rpb: torch.Tensor | None = None, scale: float | None = None, tile=(None, None)) -> torch.Tensor:
    """(B, heads, H, W, D) in and out."""
    batch, heads, height, width, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    dtype = q.dtype if q.dtype == v.dtype else torch.promote_types(q.dtype, v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    parts = plan_call(height, width, tuple(kernel_size), tuple(dilation), tile_pair(tile), half)
    if dilation == (1, 1):
        (part,) = parts
        return _attend(q[:, :, None, None], k[:, :, None, None], v[:, :, None, None], rpb, part.plan_h,
                       part.plan_w, scale)[:, :, 0, 0]
    out = q.new_zeros(height, width, batch, heads, dim)
    for part in parts:
        rows, cols = _positions(part.rows, q.device), _positions(part.cols, q.device)
        index = (slice(None), slice(None), rows[:, :, None, None], cols[None, None, :, :])

        def to_groups(x):  # (B, h, Lh, gh, Lw, gw, D) -> (B, h, gh, gw, Lh, Lw, D)
            return x[index].permute(0, 1, 3, 5, 2, 4, 6)

        attended = _attend(to_groups(q), to_groups(k), to_groups(v), rpb, part.plan_h, part.plan_w, scale)
        out = out.index_put((rows[:, :, None, None], cols[None, None, :, :]), attended.permute(4, 2, 5, 3, 0, 1, 6))
    return out.permute(2, 3, 0, 1, 4)


__all__ = ["na2d"]
