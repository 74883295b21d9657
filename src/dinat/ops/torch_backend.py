"""The torch backend: pure PyTorch, runs every call; the reference, and the default where nothing faster applies.

Eager, and under torch.compile on CPU, the call runs the tiled kernel (`tiled`) as one custom op, `dinat::na2d`,
with its backward `dinat::na2d_backward` registered as its autograd formula and fake (shape-only) versions of
both for tracing: a compiled CPU graph calls the same kernel as eager, without graph breaks. Under torch.export
(and ONNX export through it), and under torch.compile on other devices, the call is written out in plain ops
(`traced`): exporters can translate them, and on GPUs inductor fuses them into kernels several times faster than
the eager ones (docs/performance.md, GPU check).
"""

from __future__ import annotations

import torch

from . import tiled, traced
from .plan import is_exporting, needs_grad, tile_pair

Pair = tuple[int, int]


def can_run(q: torch.Tensor, has_rpb: bool, needs_grad: bool) -> str | None:
    """Whether the torch backend can run a call: it runs every call (any device, dtype, RPB, gradient).

    Args:
        q: (batch, heads, height, width, head_dim) queries of the call.
        has_rpb: whether the call adds a relative positional bias.
        needs_grad: whether the call must be differentiable.

    Returns:
        None (the reason it cannot run, which never happens).
    """
    return None


def _tile_arg(tile: list[int]) -> tuple:
    return tuple(t if t > 0 else None for t in tile)


@torch.library.custom_op("dinat::na2d", mutates_args=())
def _na2d_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None, kernel_size: list[int],
             dilation: list[int], scale: float, tile: list[int],
             keep_probabilities: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # the kernel computes in its inputs' dtype, also inside autocast regions
    with torch.autocast(q.device.type, enabled=False):
        return tiled.forward(q, k, v, rpb, tuple(kernel_size), tuple(dilation), scale, _tile_arg(tile),
                             keep_probabilities)


@_na2d_op.register_fake
def _na2d_fake(q, k, v, rpb, kernel_size, dilation, scale, tile, keep_probabilities):
    batch, heads, height, width, dim = q.shape
    out = q.new_empty(batch, height, width, heads, dim).permute(0, 3, 1, 2, 4)
    kept = []
    if keep_probabilities:
        # the tiling depends on the map's size: a compiled graph specializes on it (the batch stays dynamic)
        for part in tiled.plan_for(q, kernel_size, dilation, _tile_arg(tile)):
            if part.keeps_probabilities:
                ph, pw = part.plan_h, part.plan_w
                kept.append(q.new_empty(batch, heads, part.rows.n_groups, part.cols.n_groups, ph.n_tiles,
                                        pw.n_tiles, ph.tile * pw.tile, ph.halo * pw.halo))
    return out, kept


@torch.library.custom_op("dinat::na2d_backward", mutates_args=())
def _na2d_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      rpb: torch.Tensor | None, kept: list[torch.Tensor], kernel_size: list[int],
                      dilation: list[int], scale: float, tile: list[int],
                      want_rpb: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(q.device.type, enabled=False):
        grad_qkv, grad_rpb = tiled.backward(grad_out, q, k, v, out, rpb, kept, tuple(kernel_size), tuple(dilation),
                                            scale, _tile_arg(tile), want_rpb)
    grad_rpb = q.new_empty(0) if grad_rpb is None else grad_rpb.to(rpb.dtype).contiguous()
    return grad_qkv, grad_rpb


@_na2d_backward_op.register_fake
def _na2d_backward_fake(grad_out, q, k, v, out, rpb, kept, kernel_size, dilation, scale, tile, want_rpb):
    batch, heads, height, width, dim = q.shape
    grad_qkv = q.new_empty(batch, height, width, 3, heads, dim).permute(3, 0, 4, 1, 2, 5)
    return grad_qkv, (rpb.new_empty(rpb.shape) if want_rpb and rpb is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, dilation, scale, tile, _ = inputs
    out, kept = output
    ctx.save_for_backward(q, k, v, out, rpb, *kept)
    ctx.arguments = (kernel_size, dilation, scale, tile)


def _backward(ctx, grad_out, _grad_kept):
    q, k, v, out, rpb, *kept = ctx.saved_tensors
    want_rpb = rpb is not None and ctx.needs_input_grad[3]
    grad_qkv, grad_rpb = _na2d_backward_op(grad_out, q, k, v, out, rpb, kept, *ctx.arguments, want_rpb)
    grad_q, grad_k, grad_v = grad_qkv.unbind(0)
    return grad_q, grad_k, grad_v, (grad_rpb if want_rpb else None), None, None, None, None, None


_na2d_op.register_autograd(_backward, setup_context=_setup_context)


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Pair, dilation: Pair,
         rpb: torch.Tensor | None = None, scale: float | None = None,
         tile: int | tuple[int | None, int | None] | None = None) -> torch.Tensor:
    """Fused neighborhood attention: softmax(q k^T * scale + rpb) v over each query's window.

    Returns (B, heads, H, W, D) as a view of a (B, H, W, heads, D) tensor, so that merging heads back into
    channels is free. `tile` forces the query tile size, one int or (rows, cols) (default: chosen per axis by
    `plan.plan_axis`).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tile = tile_pair(tile)
    if is_exporting() or (torch.compiler.is_compiling() and q.device.type != "cpu"):
        return traced.na2d(q, k, v, tuple(kernel_size), tuple(dilation), rpb=rpb, scale=scale, tile=tile)
    dtype = q.dtype if q.dtype == v.dtype else torch.promote_types(q.dtype, v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, _ = _na2d_op(q, k, v, rpb, list(kernel_size), list(dilation), scale, [t or 0 for t in tile],
                      needs_grad(q, k, v, rpb))
    return out


__all__ = ["can_run", "na2d"]
