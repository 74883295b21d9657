"""The eager fused kernel of the torch backend: dense attention of query tiles against key halos.

Per class of equal-length dilation groups (a strided view, no copy), queries are cut into tiles and each
tile attends densely to the halo of keys its windows cover (an `unfold` view with a uniform step, thanks to
K//2 padding), with the window and the RPB as one additive bias (-inf outside the window), all as laid out
by `plan.plan_call`. Scores are computed in cache-sized chunks; the backward pass re-cuts the tiles and
halos, recomputes the probabilities where they were not kept, and folds halo gradients back with strided
adds. Cost and memory are linear in H*W.

Plain functions without autograd: `torch_backend` registers them as one custom op with its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import AxisPlan, ClassPlan, GroupClass, bias_index, plan_call, tile_bias

Pair = tuple[int, int]


# Tensors inside the fused path are (B, heads, gh, gw, Lh, Lw, D): dilation group (gh, gw) of a map as
# an undilated Lh x Lw map. Tiled forms append (nTh, nTw, Th*Tw or Hh*Hw, D) after (B, heads, gh, gw).

def _to_tiles(x: torch.Tensor, plan_h: AxisPlan, plan_w: AxisPlan, scale: float | None = None) -> torch.Tensor:
    """(..., Lh, Lw, D) -> contiguous (..., nTh, nTw, Th*Tw, D), padding queries at the end."""
    pad_h, pad_w = plan_h.padded_queries - plan_h.length, plan_w.padded_queries - plan_w.length
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    *lead, _, _, dim = x.shape
    x = x.unflatten(-3, (plan_h.n_tiles, plan_h.tile)).unflatten(-2, (plan_w.n_tiles, plan_w.tile))
    x = x.transpose(-4, -3)  # (..., nTh, nTw, Th, Tw, D)
    out = torch.empty(*lead, plan_h.n_tiles, plan_w.n_tiles, plan_h.tile, plan_w.tile, dim,
                      dtype=x.dtype, device=x.device)
    if scale is None:
        out.copy_(x)
    else:
        torch.mul(x, scale, out=out)
    return out.flatten(-3, -2)


def _from_tiles(x: torch.Tensor, plan_h: AxisPlan, plan_w: AxisPlan) -> torch.Tensor:
    """Inverse of `_to_tiles`: (..., nTh, nTw, Th*Tw, D) -> (..., Lh, Lw, D) (a view when unpadded)."""
    x = x.unflatten(-2, (plan_h.tile, plan_w.tile)).transpose(-4, -3)  # (..., nTh, Th, nTw, Tw, D)
    if plan_h.padded_queries == plan_h.length and plan_w.padded_queries == plan_w.length:
        return x  # the caller copies it out through its own view
    x = x.flatten(-5, -4).flatten(-3, -2)
    return x[..., :plan_h.length, :plan_w.length, :]


def _to_halos(x: torch.Tensor, plan_h: AxisPlan, plan_w: AxisPlan) -> torch.Tensor:
    """(..., Lh, Lw, D) -> contiguous (..., nTh, nTw, Hh*Hw, D): the keys (or values) each tile sees."""
    if plan_h.n_tiles == 1 and plan_w.n_tiles == 1:
        return x.reshape(*x.shape[:-3], 1, 1, plan_h.halo * plan_w.halo, x.shape[-1])
    if plan_h.pad_before or plan_h.pad_after or plan_w.pad_before or plan_w.pad_after:
        x = F.pad(x, (0, 0, plan_w.pad_before, plan_w.pad_after, plan_h.pad_before, plan_h.pad_after))
    x = x.unfold(-3, plan_h.halo, plan_h.tile).unfold(-3, plan_w.halo, plan_w.tile)  # (..., nTh, nTw, D, Hh, Hw)
    x = x.permute(*range(x.dim() - 5), -5, -4, -2, -1, -3)
    return x.reshape(*x.shape[:-3], plan_h.halo * plan_w.halo, x.shape[-1])


def _fold_axis(grad: torch.Tensor, dim: int, plan: AxisPlan) -> torch.Tensor:
    """Sum overlapping halos along one axis: (..., nT, halo, ...) at (dim, dim + 1) -> (..., padded_length, ...).

    The halo is cut into pieces of at most `tile` positions; each piece lands on the output through a
    non-overlapping strided view, so the sum is a few in-place adds (faster than aten's unfold_backward).
    """
    n_tiles, tile, halo = plan.n_tiles, plan.tile, plan.halo
    padded = (n_tiles - 1) * tile + halo
    shape = list(grad.shape)
    out = grad.new_zeros(shape[:dim] + [padded] + shape[dim + 2:])
    for start in range(0, halo, tile):
        length = min(tile, halo - start)
        dest = out.narrow(dim, start, (n_tiles - 1) * tile + length).unfold(dim, length, tile)  # (..., nT, ..., len)
        dest.add_(grad.narrow(dim + 1, start, length).movedim(dim + 1, -1))
    return out


def _from_halos(grad: torch.Tensor, shape: torch.Size, plan_h: AxisPlan, plan_w: AxisPlan) -> torch.Tensor:
    """Adjoint of `_to_halos`: sum each tile's halo gradient back onto the (..., Lh, Lw, D) map."""
    if plan_h.n_tiles == 1 and plan_w.n_tiles == 1:
        return grad.reshape(shape)
    *lead, len_h, len_w, dim = shape
    nd = len(lead)
    grad = grad.unflatten(-2, (plan_h.halo, plan_w.halo))  # (..., nTh, nTw, Hh, Hw, D)
    grad = grad.movedim(nd + 2, nd + 1)  # (..., nTh, Hh, nTw, Hw, D)
    grad = _fold_axis(grad, nd + 2, plan_w)  # (..., nTh, Hh, Wp, D)
    grad = _fold_axis(grad, nd, plan_h)  # (..., Hp, Wp, D)
    return grad[..., plan_h.pad_before:plan_h.pad_before + len_h, plan_w.pad_before:plan_w.pad_before + len_w, :]


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, bias and softmax stay in float32 for half-precision inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _write_tiles(dest: torch.Tensor, tiles: torch.Tensor, plan_h: AxisPlan, plan_w: AxisPlan) -> None:
    """Copy (..., nTh, nTw, Th*Tw, D) tiles into a (..., Lh, Lw, D) view, in one pass when unpadded."""
    source = _from_tiles(tiles, plan_h, plan_w)
    if source.dim() > dest.dim():  # unpadded: (..., nTh, Th, nTw, Tw, D) against (..., Lh, Lw, D)
        dest = dest.unflatten(-3, (plan_h.n_tiles, plan_h.tile)).unflatten(-2, (plan_w.n_tiles, plan_w.tile))
    dest.copy_(source)


# Scores are computed in chunks of about this many bytes, so that the matmul, the bias, the softmax and the
# second matmul of a chunk run in cache instead of streaming one large score tensor through memory.
CHUNK_BYTES = 4 * 2**20


def _chunks(q_tiles: torch.Tensor, halo_len: int) -> list[tuple[slice, slice, slice]]:
    """(batch, heads, tile rows) slices cutting (B, h, gh, gw, nTh, ...) tiles into chunks of about CHUNK_BYTES
    of scores: whole batch items, else single items by groups of heads (both contiguous slices, which the
    matmuls read and write in place), else rows of tiles of one head."""
    batch, heads, n_rows = q_tiles.shape[0], q_tiles.shape[1], q_tiles.shape[4]
    per_head = q_tiles[0, 0].numel() // q_tiles.shape[-1] * halo_len * q_tiles.element_size()
    every = slice(None)
    if per_head * heads <= CHUNK_BYTES:
        step = max(1, CHUNK_BYTES // (per_head * heads))
        return [(slice(b, b + step), every, every) for b in range(0, batch, step)]
    if per_head <= CHUNK_BYTES:
        step = CHUNK_BYTES // per_head
        return [(slice(b, b + 1), slice(h, h + step), every) for b in range(batch) for h in range(0, heads, step)]
    step = max(1, n_rows * CHUNK_BYTES // per_head)
    return [(slice(b, b + 1), slice(h, h + 1), slice(r, r + step))
            for b in range(batch) for h in range(heads) for r in range(0, n_rows, step)]


def _at(x: torch.Tensor, chunk: tuple[slice, slice, slice]) -> torch.Tensor:
    """The chunk of a (B, h, gh, gw, nTh, ...) tensor; dims of size 1 (a broadcast bias) are taken whole."""
    batch, heads, rows = (part if x.shape[dim] > 1 else slice(None) for dim, part in zip((0, 1, 4), chunk))
    return x[batch, heads, :, :, rows]


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Row softmax over the last dim, in place (callers keep `x` as the probabilities). The CPU kernel reads each
    row before writing it, so it can write over its input; elsewhere the result is copied back."""
    if x.device.type != "cpu":
        return x.copy_(x.softmax(dim=-1))
    return torch.ops.aten._softmax.out(x, -1, False, out=x)


def _attend(q_tiles, k_halo, v_halo, bias, keep_probs: bool):
    """Dense attention of each tile against its halo, chunk by chunk; returns (probabilities or None, output)."""
    out = q_tiles.new_empty(q_tiles.shape[:-1] + v_halo.shape[-1:])
    probs = q_tiles.new_empty(q_tiles.shape[:-1] + k_halo.shape[-2:-1]) if keep_probs else None
    for chunk in _chunks(q_tiles, k_halo.shape[-2]):
        # contiguous chunks: the matmuls write into the outputs directly
        direct = chunk[2] == slice(None)
        scores = torch.matmul(_at(q_tiles, chunk), _at(k_halo, chunk).transpose(-1, -2),
                              out=_at(probs, chunk) if keep_probs and direct else None)
        # in half precision too: converting the scores to float32 and back costs more than the softmax
        # (whose CPU kernel accumulates in float32 anyway)
        scores = _softmax_(scores.add_(_at(bias, chunk)))
        if keep_probs and not direct:
            _at(probs, chunk).copy_(scores)
        if direct:
            torch.matmul(scores, _at(v_halo, chunk), out=_at(out, chunk))
        else:
            _at(out, chunk).copy_(torch.matmul(scores, _at(v_halo, chunk)))
    return probs, out


def _attend_backward(grad_out, q_tiles, k_halo, v_halo, probs, bias, out_tiles, plan_h, plan_w, scale, want_rpb):
    """Gradients of one class, chunk by chunk: (dq tiles, dk halos, dv halos, d rpb or None).

    `probs` are the saved probabilities, or None: then they are recomputed per chunk from the tiles and `bias`.
    """
    grad_tiles = _to_tiles(grad_out.to(out_tiles.dtype), plan_h, plan_w)
    grad_q, grad_k, grad_v = torch.empty_like(q_tiles), torch.empty_like(k_halo), torch.empty_like(v_halo)
    softmax_dtype = _softmax_dtype(q_tiles.dtype)
    # d(loss)/d(score) summed over batch and groups, per head and tile position: feeds the RPB gradient
    heads = q_tiles.shape[1]
    score_grad_sum = (q_tiles.new_zeros((heads,) + q_tiles.shape[4:-1] + k_halo.shape[-2:-1], dtype=softmax_dtype)
                      if want_rpb else None)
    for chunk in _chunks(q_tiles, k_halo.shape[-2]):
        d_out = _at(grad_tiles, chunk)
        q_chunk, k_chunk = _at(q_tiles, chunk), _at(k_halo, chunk)
        if probs is not None:
            p = _at(probs, chunk)
        else:  # the forward pass's scores and softmax, again (same ops, same values)
            p = _softmax_(torch.matmul(q_chunk, k_chunk.transpose(-1, -2)).add_(_at(bias, chunk)))
        _at(grad_v, chunk).copy_(torch.matmul(p.transpose(-1, -2), d_out))
        grad_p = torch.matmul(d_out, _at(v_halo, chunk).transpose(-1, -2))
        # softmax backward: dS = P * (dP - sum_j P_j dP_j), and sum_j P_j dP_j = dO . O per query
        delta = (d_out.to(softmax_dtype) * _at(out_tiles, chunk).to(softmax_dtype)).sum(dim=-1, keepdim=True)
        grad_s = grad_p.to(softmax_dtype).sub_(delta).mul_(p)
        if want_rpb:
            score_grad_sum[chunk[1], chunk[2]] += grad_s.sum(dim=(0, 2, 3))
        grad_s = grad_s.to(q_tiles.dtype)
        _at(grad_q, chunk).copy_(torch.matmul(grad_s, k_chunk).mul_(scale))
        _at(grad_k, chunk).copy_(torch.matmul(grad_s.transpose(-1, -2), q_chunk))  # q_tiles are already scaled
    grad_rpb = _rpb_grad(score_grad_sum, plan_h, plan_w) if want_rpb else None
    return grad_q, grad_k, grad_v, grad_rpb


def _rpb_grad(score_grad_sum: torch.Tensor, plan_h: AxisPlan, plan_w: AxisPlan) -> torch.Tensor:
    """(h, nTh, nTw, TT, HH) score gradients -> (h, 2Kh-1, 2Kw-1): summed by relative position."""
    heads = score_grad_sum.shape[0]
    index = bias_index(plan_h, plan_w, score_grad_sum.device)
    n_rel = (2 * plan_h.kernel_size - 1) * (2 * plan_w.kernel_size - 1)
    table = score_grad_sum.new_zeros(heads, n_rel + 1)
    table.index_add_(1, index.reshape(-1), score_grad_sum.reshape(heads, -1))
    return table[:, :n_rel].reshape(heads, 2 * plan_h.kernel_size - 1, 2 * plan_w.kernel_size - 1)



def _group_view(x: torch.Tensor, rows: GroupClass, cols: GroupClass) -> torch.Tensor:
    """(B, h, H, W, D) -> (B, h, gh, gw, Lh, Lw, D): a view of one class of dilation groups."""
    x = x.narrow(2, rows.offset, x.shape[2] - rows.offset).narrow(3, cols.offset, x.shape[3] - cols.offset)
    x = x.unfold(2, rows.n_groups, rows.dilation).unfold(3, cols.n_groups, cols.dilation)  # (B, h, Lh, Lw, D, gh, gw)
    return x.permute(0, 1, 5, 6, 2, 3, 4)



# The bias of a class depends only on the RPB's values and the plan: it is kept, keyed by the plan and the
# RPB's storage and checked against a copy of the RPB (a few hundred numbers), so that a layer's bias is
# gathered once per weight update instead of once per call.
_BIAS_CACHE: dict = {}
BIAS_CACHE_BYTES = 256 * 2**20


def _class_bias(rpb: torch.Tensor | None, heads: int, plan_h: AxisPlan, plan_w: AxisPlan, device,
                dtype: torch.dtype) -> torch.Tensor:
    key = (plan_h, plan_w, heads, dtype, str(device), None if rpb is None else (rpb.data_ptr(), rpb.dtype))
    hit = _BIAS_CACHE.get(key)
    if hit is not None and (rpb is None or torch.equal(hit[0], rpb)):
        return hit[1]
    bias = tile_bias(None if rpb is None else rpb.detach(), heads, plan_h, plan_w, device, dtype)
    if sum(entry[1].nbytes for entry in _BIAS_CACHE.values()) + bias.nbytes > BIAS_CACHE_BYTES:
        _BIAS_CACHE.clear()
    _BIAS_CACHE[key] = (None if rpb is None else rpb.detach().clone(), bias)
    return bias


def plan_for(q: torch.Tensor, kernel_size, dilation, tile) -> tuple[ClassPlan, ...]:
    """The plan of a call on q (B, heads, H, W, D): tiles sized for its dtype."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    return plan_call(int(q.shape[2]), int(q.shape[3]), tuple(kernel_size), tuple(dilation), tuple(tile), half)


def _cut(part: ClassPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """One class's scaled query tiles and key and value halos."""
    rows, cols, plan_h, plan_w = part.rows, part.cols, part.plan_h, part.plan_w
    return (_to_tiles(_group_view(q, rows, cols), plan_h, plan_w, scale),
            _to_halos(_group_view(k, rows, cols), plan_h, plan_w),
            _to_halos(_group_view(v, rows, cols), plan_h, plan_w))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None, kernel_size: Pair,
            dilation: Pair, scale: float, tile=(None, None), keep_probabilities: bool = False):
    """(out, kept probabilities): out (B, heads, H, W, D) is a view of (B, H, W, heads, D) memory (merging heads
    back into channels is free); probabilities are kept for backward where the plan says so (a list, one per
    class that keeps them)."""
    batch, heads, height, width, dim = q.shape
    out = q.new_empty(batch, height, width, heads, dim).permute(0, 3, 1, 2, 4)
    kept = []
    for part in plan_for(q, kernel_size, dilation, tile):
        rows, cols, plan_h, plan_w = part.rows, part.cols, part.plan_h, part.plan_w
        q_tiles, k_halo, v_halo = _cut(part, q, k, v, scale)
        bias = _class_bias(rpb, heads, plan_h, plan_w, q.device, q.dtype)
        keep = keep_probabilities and part.keeps_probabilities
        probs, out_tiles = _attend(q_tiles, k_halo, v_halo, bias[None, :, None, None], keep)
        _write_tiles(_group_view(out, rows, cols), out_tiles, plan_h, plan_w)
        if keep:
            kept.append(probs)
    return out, kept


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             rpb: torch.Tensor | None, kept: list[torch.Tensor], kernel_size: Pair, dilation: Pair, scale: float,
             tile=(None, None), want_rpb: bool = False):
    """(grad_qkv, grad_rpb or None): grad_qkv (3, B, heads, H, W, D) is a view of (B, H, W, 3, heads, D) memory,
    the layout of a fused qkv projection's output."""
    batch, heads, height, width, dim = grad_out.shape
    grads = grad_out.new_empty(batch, height, width, 3, heads, dim, dtype=q.dtype).permute(3, 0, 4, 1, 2, 5)
    grad_q, grad_k, grad_v = grads.unbind(0)
    grad_rpb = None
    kept = iter(kept)
    for part in plan_for(q, kernel_size, dilation, tile):
        rows, cols, plan_h, plan_w = part.rows, part.cols, part.plan_h, part.plan_w
        q_tiles, k_halo, v_halo = _cut(part, q, k, v, scale)
        out_tiles = _to_tiles(_group_view(out, rows, cols), plan_h, plan_w)
        probs = next(kept, None) if part.keeps_probabilities else None
        bias = None if probs is not None else _class_bias(rpb, heads, plan_h, plan_w, q.device, q.dtype)
        dq, dk, dv, drpb = _attend_backward(_group_view(grad_out, rows, cols), q_tiles, k_halo, v_halo, probs,
                                            None if bias is None else bias[None, :, None, None], out_tiles,
                                            plan_h, plan_w, scale, want_rpb and rpb is not None)
        _write_tiles(_group_view(grad_q, rows, cols), dq, plan_h, plan_w)
        _group_view(grad_k, rows, cols).copy_(_from_halos(dk, _group_view(grad_k, rows, cols).shape, plan_h, plan_w))
        _group_view(grad_v, rows, cols).copy_(_from_halos(dv, _group_view(grad_v, rows, cols).shape, plan_h, plan_w))
        if drpb is not None:
            grad_rpb = drpb if grad_rpb is None else grad_rpb + drpb
    return grads, grad_rpb


__all__ = ["forward", "backward", "plan_for"]
