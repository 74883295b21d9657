"""Neighborhood attention in pure PyTorch: the reference backend, and the default where nothing faster applies.

Tensors are heads-first, as in NATTEN 0.17's `na2d_qk` / `na2d_av`:
    q, k, v:  (batch, heads, height, width, head_dim)
    weights:  (batch, heads, height, width, kernel_h * kernel_w), keys in row-major window order
    rpb:      (heads, 2 * kernel_h - 1, 2 * kernel_w - 1)

Semantics (NATTEN 0.17): an axis of length L with dilation d splits into d interleaved groups
(positions i with i % d == g). Each group is an ordinary axis of length ceil((L - g) / d) on which
the window of K keys is clamped to stay inside, so every query sees exactly K keys per axis.

The unfused pair (`na2d_qk`, `na2d_av`) gathers each window. The fused `na2d` never does: each class
of equal-length dilation groups is a strided view, cut into tiles of queries; each tile attends densely
to its halo of keys (an `unfold` view with a uniform step, thanks to K//2 padding), with the window and
the RPB as one additive bias (-inf outside the window). Scores are computed in cache-sized chunks; a
custom backward recomputes the tiles and folds halo gradients back with strided adds. Cost and memory
are linear in H*W; tile sizes are chosen per axis (`plan_axis`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Pair = tuple[int, int]


def window_indices(length: int, kernel_size: int, dilation: int, device: torch.device | None = None):
    """Key positions and RPB offsets of every query's window along one axis.

    Returns `(keys, rel)`, both (length, kernel_size) long tensors: `keys[i, t]` is the position of the
    t-th key in the window of query i, and `rel[i, t]` its index along the RPB axis (0 .. 2K-2).
    """
    pos = torch.arange(length, device=device)
    group, pos_in_group = pos % dilation, pos // dilation
    group_length = (length - group + dilation - 1) // dilation  # ceil((L - g) / d)
    half = kernel_size // 2
    # clamp the window inside the query's group: start = clamp(i' - K//2, 0, L' - K)
    start = torch.minimum((pos_in_group - half).clamp(min=0), group_length - kernel_size)
    key_in_group = start[:, None] + torch.arange(kernel_size, device=device)
    keys = group[:, None] + dilation * key_in_group
    rel = key_in_group - pos_in_group[:, None] + kernel_size - 1
    return keys, rel


def _gather_neighbors(x: torch.Tensor, keys_h: torch.Tensor, keys_w: torch.Tensor) -> torch.Tensor:
    """(B, h, H, W, D) -> (B, h, H, W, Kh, Kw, D): every query's window of x."""
    nb = x[:, :, keys_h[:, :, None, None], keys_w[None, None, :, :]]  # (B, h, H, Kh, W, Kw, D)
    return nb.permute(0, 1, 2, 4, 3, 5, 6)


def _rpb_bias(rpb: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """(heads, 2Kh-1, 2Kw-1) -> (heads, H, W, Kh * Kw): the bias of every (query, window key) pair."""
    bias = rpb[:, rel_h[:, :, None, None], rel_w[None, None, :, :]]  # (h, H, Kh, W, Kw)
    bias = bias.permute(0, 1, 3, 2, 4)
    return bias.reshape(bias.shape[0], bias.shape[1], bias.shape[2], -1)


def na2d_qk(q: torch.Tensor, k: torch.Tensor, kernel_size: Pair, dilation: Pair,
            rpb: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of every query against its window: (B, h, H, W, Kh*Kw). q is used as given (scale it first)."""
    _, _, height, width, _ = q.shape
    keys_h, rel_h = window_indices(height, kernel_size[0], dilation[0], q.device)
    keys_w, rel_w = window_indices(width, kernel_size[1], dilation[1], q.device)
    k_nb = _gather_neighbors(k, keys_h, keys_w)
    scores = torch.einsum("bhxyd,bhxyijd->bhxyij", q, k_nb).flatten(-2)
    if rpb is not None:
        scores = scores + _rpb_bias(rpb, rel_h, rel_w).to(scores.dtype)
    return scores


def na2d_av(weights: torch.Tensor, v: torch.Tensor, kernel_size: Pair, dilation: Pair) -> torch.Tensor:
    """Weights (B, h, H, W, Kh*Kw) times each query's window of values: (B, h, H, W, D)."""
    _, _, height, width, _ = v.shape
    keys_h, _ = window_indices(height, kernel_size[0], dilation[0], v.device)
    keys_w, _ = window_indices(width, kernel_size[1], dilation[1], v.device)
    v_nb = _gather_neighbors(v, keys_h, keys_w)
    weights = weights.unflatten(-1, kernel_size)
    return torch.einsum("bhxyij,bhxyijd->bhxyd", weights.to(v.dtype), v_nb)


# ---------------------------------------------------------------------------------------------
# Fused path. Each dilation group is an ordinary (undilated) map; it is cut into tiles of queries,
# and each tile attends densely to the halo of keys its windows cover, with the window shape and the
# RPB expressed as one additive bias (-inf outside the window). Memory and work stay linear in H*W.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AxisPlan:
    """How one (undilated) axis of length `length` is cut into query tiles and key halos."""

    length: int
    kernel_size: int
    tile: int
    n_tiles: int
    halo: int  # keys each tile sees: the whole axis for one tile, else tile + kernel_size - 1
    pad_before: int  # key padding so that halo t starts at t * tile - pad_before, a uniform step
    pad_after: int

    @property
    def padded_queries(self) -> int:
        return self.n_tiles * self.tile


def _axis_plan_for_tile(length: int, kernel_size: int, tile: int) -> AxisPlan:
    if tile >= length:
        return AxisPlan(length, kernel_size, length, 1, length, 0, 0)
    n_tiles = -(-length // tile)
    half = kernel_size // 2
    halo = tile + kernel_size - 1
    return AxisPlan(length, kernel_size, tile, n_tiles, halo, half, n_tiles * tile - length + half)


def _tile_fits(length: int, kernel_size: int, tile: int) -> bool:
    """Whether every query's clamped window lies inside its tile's halo.

    Windows near the ends are clamped inward; that stays inside the halo when the first tile has more
    than K//2 queries and the last tile (if partial) has more than K//2 real queries.
    """
    half = kernel_size // 2
    return tile >= length or (tile > half and (length % tile == 0 or length % tile > half))


@functools.lru_cache(maxsize=256)
def plan_axis(length: int, kernel_size: int, tile: int | None = None, half_precision: bool = False) -> AxisPlan:
    """Pick the tile size along one axis: the least work (padded queries x halo keys), counting a fixed
    overhead per tile that stands for the lower efficiency of small matmuls."""
    if tile is not None:
        if not _tile_fits(length, kernel_size, tile):
            raise ValueError(f"tile {tile} does not fit an axis of length {length} with kernel {kernel_size}")
        return _axis_plan_for_tile(length, kernel_size, tile)
    overhead = TILE_OVERHEAD_HALF if half_precision else TILE_OVERHEAD
    best, best_cost = None, None
    for candidate in range(kernel_size // 2 + 1, length + 1):
        if not _tile_fits(length, kernel_size, candidate):
            continue
        plan = _axis_plan_for_tile(length, kernel_size, candidate)
        cost = plan.n_tiles * (plan.tile + overhead) * plan.halo
        if best_cost is None or cost < best_cost:
            best, best_cost = plan, cost
    return best


# Overheads in queries per tile, fitted to CPU timings of DiNAT's shapes (K=7, head_dim 32): float32 matmuls
# lose more to small tiles than bfloat16 ones (7x7 tiles at 56x56 in float32, 4x4 in bfloat16).
TILE_OVERHEAD = 6
TILE_OVERHEAD_HALF = 2


def _axis_masks(plan: AxisPlan):
    """(allowed, rel), each (n_tiles, tile, halo): is halo key m in the window of query j of tile t, and
    its RPB index. Padding queries past the end borrow the window of the last query."""
    length, ks, half = plan.length, plan.kernel_size, plan.kernel_size // 2
    query = (torch.arange(plan.n_tiles)[:, None] * plan.tile + torch.arange(plan.tile)).clamp(max=length - 1)
    start = (query - half).clamp(min=0, max=length - ks)
    key = (torch.arange(plan.n_tiles) * plan.tile - plan.pad_before)[:, None] + torch.arange(plan.halo)
    offset = key[:, None, :] - start[:, :, None]
    allowed = (offset >= 0) & (offset < ks)
    rel = key[:, None, :] - query[:, :, None] + ks - 1
    return allowed, rel


_BIAS_INDEX_CACHE: dict = {}


def _bias_index(plan_h: AxisPlan, plan_w: AxisPlan, device) -> torch.Tensor:
    """(nTh, nTw, Th*Tw, Hh*Hw) long: flat RPB index of each (query, halo key), or R = (2Kh-1)(2Kw-1)
    (a slot holding -inf) where the key is outside the query's window."""
    key = (plan_h, plan_w, str(device))
    index = None if torch.compiler.is_compiling() else _BIAS_INDEX_CACHE.get(key)
    if index is None:
        allowed_h, rel_h = _axis_masks(plan_h)
        allowed_w, rel_w = _axis_masks(plan_w)
        span_w = 2 * plan_w.kernel_size - 1
        n_rel = (2 * plan_h.kernel_size - 1) * span_w
        # (nTh, nTw, Th, Tw, Hh, Hw)
        flat = rel_h[:, None, :, None, :, None] * span_w + rel_w[None, :, None, :, None, :]
        allowed = allowed_h[:, None, :, None, :, None] & allowed_w[None, :, None, :, None, :]
        flat = torch.where(allowed, flat, torch.full_like(flat, n_rel))
        index = flat.reshape(plan_h.n_tiles, plan_w.n_tiles, plan_h.tile * plan_w.tile, -1).to(device)
        if torch.compiler.is_compiling():
            return index
        if len(_BIAS_INDEX_CACHE) > 64:
            _BIAS_INDEX_CACHE.clear()
        _BIAS_INDEX_CACHE[key] = index
    return index


def _tile_bias(rpb: torch.Tensor | None, heads: int, plan_h: AxisPlan, plan_w: AxisPlan, device,
               dtype: torch.dtype, detach: bool = True) -> torch.Tensor:
    """(heads or 1, nTh, nTw, Th*Tw, Hh*Hw): the RPB inside each window, -inf outside."""
    index = _bias_index(plan_h, plan_w, device)
    n_rel = (2 * plan_h.kernel_size - 1) * (2 * plan_w.kernel_size - 1)
    outside = torch.full((heads if rpb is not None else 1, 1), float("-inf"), device=device, dtype=dtype)
    if rpb is None:
        table = torch.cat([torch.zeros(1, n_rel, device=device, dtype=dtype), outside], dim=1)
    else:
        table = (rpb.detach() if detach else rpb).reshape(heads, n_rel).to(dtype)
        table = torch.cat([table, outside], dim=1)
    return table[:, index]


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
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):  # traced: no out=
        x = x if scale is None else x * scale
        return x.reshape(*lead, plan_h.n_tiles, plan_w.n_tiles, plan_h.tile * plan_w.tile, dim)
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


def _chunks(q_tiles: torch.Tensor, halo_len: int):
    """Index tuples cutting (B, h, gh, gw, nTh, ...) tiles along batch, then (if one item is too big) nTh."""
    batch, n_rows = q_tiles.shape[0], q_tiles.shape[4]
    per_item = q_tiles[0].numel() // q_tiles.shape[-1] * halo_len * q_tiles.element_size()
    if per_item <= CHUNK_BYTES:
        step = max(1, CHUNK_BYTES // per_item)
        return [(slice(b, b + step),) for b in range(0, batch, step)]
    step = max(1, n_rows * CHUNK_BYTES // per_item)
    every = slice(None)
    return [(slice(b, b + 1), every, every, every, slice(r, r + step)) for b in range(batch) for r in range(0, n_rows, step)]


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Row softmax over the last dim, in place on CPU (its kernel reads each row before writing it)."""
    if x.device.type != "cpu":
        return x.softmax(dim=-1)
    return torch.ops.aten._softmax.out(x, -1, False, out=x)


def _attend(q_tiles, k_halo, v_halo, bias, keep_probs: bool):
    """Dense attention of each tile against its halo, chunk by chunk; returns (probabilities or None, output)."""
    out = q_tiles.new_empty(q_tiles.shape[:-1] + v_halo.shape[-1:])
    probs = q_tiles.new_empty(q_tiles.shape[:-1] + k_halo.shape[-2:-1]) if keep_probs else None
    for index in _chunks(q_tiles, k_halo.shape[-2]):
        # batch chunks are contiguous slices: the matmuls write into them directly
        direct = len(index) == 1
        scores = torch.matmul(q_tiles[index], k_halo[index].transpose(-1, -2),
                              out=probs[index] if keep_probs and direct else None)
        # in half precision too: converting the scores to float32 and back costs more than the softmax
        # (whose CPU kernel accumulates in float32 anyway)
        scores = _softmax_(scores.add_(bias if direct else bias[(slice(None),) + index[1:]]))
        if keep_probs and not direct:
            probs[index] = scores
        if direct:
            torch.matmul(scores, v_halo[index], out=out[index])
        else:
            out[index] = torch.matmul(scores, v_halo[index])
    return probs, out


class _NeighborhoodAttention(torch.autograd.Function):
    """Fused NA on (B, heads, H, W, D) tensors: per class of equal dilation groups, query tiles attend to
    their key halos. Saves q, k, v and the output; the backward pass re-cuts the tiles and halos (cheap copies)
    rather than keeping them (~3.5x k and v at 7x7 tiles). Probabilities are kept only where a tile's halo
    is small (at most 2 K*K keys per query, e.g. whole dilation groups of DiNAT at 224); elsewhere the
    backward pass recomputes them chunk by chunk, so training memory stays below the reference's."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel_size: Pair, dilation: Pair, scale: float, tile):
        # the op computes in its inputs' dtype (under autocast q, k, v arrive in the autocast dtype already)
        with torch.autocast(q.device.type, enabled=False):
            return _NeighborhoodAttention._forward(ctx, q, k, v, rpb, kernel_size, dilation, scale, tile)

    @staticmethod
    def _forward(ctx, q, k, v, rpb, kernel_size: Pair, dilation: Pair, scale: float, tile):
        batch, heads, height, width, dim = q.shape
        dtype = q.dtype if q.dtype == v.dtype else torch.promote_types(q.dtype, v.dtype)
        input_dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = q.new_empty(batch, height, width, heads, dim).permute(0, 3, 1, 2, 4)
        probs_per_class, classes = [], []
        for rows in _group_classes(height, dilation[0]):
            for cols in _group_classes(width, dilation[1]):
                half = dtype in (torch.float16, torch.bfloat16)
                plan_h = plan_axis(rows[2], kernel_size[0], tile[0], half)
                plan_w = plan_axis(cols[2], kernel_size[1], tile[1], half)
                q_tiles = _to_tiles(_group_view(q, rows, cols), plan_h, plan_w, scale)
                k_halo = _to_halos(_group_view(k, rows, cols), plan_h, plan_w)
                v_halo = _to_halos(_group_view(v, rows, cols), plan_h, plan_w)
                bias = _tile_bias(rpb, heads, plan_h, plan_w, q.device, dtype)
                keep = any(ctx.needs_input_grad[:4]) and _keeps_probabilities(plan_h, plan_w)
                probs, out_tiles = _attend(q_tiles, k_halo, v_halo, bias[None, :, None, None], keep)
                _write_tiles(_group_view(out, rows, cols), out_tiles, plan_h, plan_w)
                classes.append((rows, cols, plan_h, plan_w))
                probs_per_class.append(probs)
        if any(ctx.needs_input_grad[:4]):
            ctx.save_for_backward(q, k, v, out, rpb, *[p for p in probs_per_class if p is not None])
            ctx.kept = [p is not None for p in probs_per_class]
            ctx.classes, ctx.scale, ctx.has_rpb = classes, scale, rpb is not None
            ctx.input_dtypes = input_dtypes
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _NeighborhoodAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        q, k, v, out, rpb, *kept_probs = ctx.saved_tensors
        kept_probs = iter(kept_probs)
        batch, heads, height, width, dim = grad_out.shape
        # q, k, v gradients side by side in (B, H, W, 3, heads, D) memory: the layout of a fused qkv projection
        grads = grad_out.new_empty(batch, height, width, 3, heads, dim, dtype=q.dtype).permute(3, 0, 4, 1, 2, 5)
        grad_q, grad_k, grad_v = grads.unbind(0)
        grad_rpb = None
        for index, (rows, cols, plan_h, plan_w) in enumerate(ctx.classes):
            q_tiles = _to_tiles(_group_view(q, rows, cols), plan_h, plan_w, ctx.scale)
            k_halo = _to_halos(_group_view(k, rows, cols), plan_h, plan_w)
            v_halo = _to_halos(_group_view(v, rows, cols), plan_h, plan_w)
            out_tiles = _to_tiles(_group_view(out, rows, cols), plan_h, plan_w)
            if ctx.kept[index]:
                probs, bias = next(kept_probs), None
            else:
                probs, bias = None, _tile_bias(rpb, heads, plan_h, plan_w, q.device, q.dtype)[None, :, None, None]
            dq, dk, dv, drpb = _attend_backward(_group_view(grad_out, rows, cols), q_tiles, k_halo, v_halo, probs,
                                                bias, out_tiles, plan_h, plan_w, ctx.scale,
                                                ctx.has_rpb and ctx.needs_input_grad[3])
            _write_tiles(_group_view(grad_q, rows, cols), dq, plan_h, plan_w)
            _group_view(grad_k, rows, cols).copy_(_from_halos(dk, _group_view(grad_k, rows, cols).shape, plan_h, plan_w))
            _group_view(grad_v, rows, cols).copy_(_from_halos(dv, _group_view(grad_v, rows, cols).shape, plan_h, plan_w))
            if drpb is not None:
                grad_rpb = drpb if grad_rpb is None else grad_rpb + drpb
        dtypes = ctx.input_dtypes
        return (grad_q.to(dtypes[0]), grad_k.to(dtypes[1]), grad_v.to(dtypes[2]), grad_rpb,
                None, None, None, None)


def _keeps_probabilities(plan_h: AxisPlan, plan_w: AxisPlan) -> bool:
    """Keep a class's probabilities for backward when each query's halo has at most 2 K*K keys (the reference
    keeps two K*K tensors per query: the softmax output and its dropout); recompute them otherwise."""
    return plan_h.halo * plan_w.halo <= 2 * plan_h.kernel_size * plan_w.kernel_size


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
    for index in _chunks(q_tiles, k_halo.shape[-2]):
        d_out = grad_tiles[index]
        if probs is not None:
            p = probs[index]
        else:  # the forward pass's scores and softmax, again (same ops, same values)
            p = torch.matmul(q_tiles[index], k_halo[index].transpose(-1, -2))
            p = _softmax_(p.add_(bias if len(index) == 1 else bias[(slice(None),) + index[1:]]))
        grad_v[index] = torch.matmul(p.transpose(-1, -2), d_out)
        grad_p = torch.matmul(d_out, v_halo[index].transpose(-1, -2))
        # softmax backward: dS = P * (dP - sum_j P_j dP_j), and sum_j P_j dP_j = dO . O per query
        delta = (d_out.to(softmax_dtype) * out_tiles[index].to(softmax_dtype)).sum(dim=-1, keepdim=True)
        grad_s = grad_p.to(softmax_dtype).sub_(delta).mul_(p)
        if want_rpb:
            rows = index[4] if len(index) > 1 else slice(None)
            score_grad_sum[:, rows] += grad_s.sum(dim=(0, 2, 3))
        grad_s = grad_s.to(q_tiles.dtype)
        grad_q[index] = torch.matmul(grad_s, k_halo[index]).mul_(scale)
        grad_k[index] = torch.matmul(grad_s.transpose(-1, -2), q_tiles[index])  # q_tiles are already scaled
    grad_rpb = _rpb_grad(score_grad_sum, plan_h, plan_w) if want_rpb else None
    return grad_q, grad_k, grad_v, grad_rpb


def _rpb_grad(score_grad_sum: torch.Tensor, plan_h: AxisPlan, plan_w: AxisPlan) -> torch.Tensor:
    """(h, nTh, nTw, TT, HH) score gradients -> (h, 2Kh-1, 2Kw-1): summed by relative position."""
    heads = score_grad_sum.shape[0]
    index = _bias_index(plan_h, plan_w, score_grad_sum.device)
    n_rel = (2 * plan_h.kernel_size - 1) * (2 * plan_w.kernel_size - 1)
    table = score_grad_sum.new_zeros(heads, n_rel + 1)
    table.index_add_(1, index.reshape(-1), score_grad_sum.reshape(heads, -1))
    return table[:, :n_rel].reshape(heads, 2 * plan_h.kernel_size - 1, 2 * plan_w.kernel_size - 1)


def _group_classes(length: int, dilation: int) -> list[tuple[int, int, int, int]]:
    """Split an axis into classes of equal-length dilation groups: [(offset, n_groups, length, dilation)].

    Groups g < length % dilation have one more position than the rest. A class holds positions
    offset + g + i * dilation for g < n_groups, i < length: an `unfold` with step `dilation`, a view.
    """
    longer = length % dilation
    classes = [(0, longer, length // dilation + 1, dilation)] if longer else []
    classes.append((longer, dilation - longer, length // dilation, dilation))
    return classes


def _group_view(x: torch.Tensor, rows, cols) -> torch.Tensor:
    """(B, h, H, W, D) -> (B, h, gh, gw, Lh, Lw, D): a view of one class of dilation groups."""
    (off_h, n_h, _, dil_h), (off_w, n_w, _, dil_w) = rows, cols
    x = x.narrow(2, off_h, x.shape[2] - off_h).narrow(3, off_w, x.shape[3] - off_w)
    x = x.unfold(2, n_h, dil_h).unfold(3, n_w, dil_w)  # (B, h, Lh, Lw, D, gh, gw)
    return x.permute(0, 1, 5, 6, 2, 3, 4)


# -- traced path (torch.compile / torch.export) -----------------------------------------------------

def _traced_dilation_groups(length: int, dilation: int, device) -> list[torch.Tensor]:
    """Positions of the dilation groups along one axis, as (group_length, n_groups) index tensors.

    Groups of equal length are batched together; when `length % dilation != 0` there are two lengths.
    """
    longer = length % dilation  # groups 0 .. longer-1 have one more position
    classes = []
    if longer:
        n = (length + dilation - 1) // dilation
        classes.append(torch.arange(n, device=device)[:, None] * dilation + torch.arange(longer, device=device))
    n = length // dilation
    classes.append(torch.arange(n, device=device)[:, None] * dilation + torch.arange(longer, dilation, device=device))
    return classes


def _traced_axis_tiling(length: int, kernel_size: int, tile: int, device):
    """Tiles of `tile` queries along one (undilated) axis and the halo of keys they need.

    Returns `(halo, allowed, rel)`: halo (n_tiles, halo_len) key positions; allowed and rel are
    (n_tiles, tile, halo_len): whether a halo key is in the query's window, and its RPB index.
    Queries past the end (padding of the last tile) get the window of the last query.
    """
    n_tiles = -(-length // tile)
    halo_len = min(tile + kernel_size - 1, length)
    half = kernel_size // 2
    query = (torch.arange(n_tiles, device=device)[:, None] * tile + torch.arange(tile, device=device))
    query = query.clamp(max=length - 1)
    start = (query - half).clamp(min=0, max=length - kernel_size)  # window start per query
    halo_start = start[:, 0].clamp(max=length - halo_len)
    halo = halo_start[:, None] + torch.arange(halo_len, device=device)
    offset = halo[:, None, :] - start[:, :, None]  # key position inside the query's window
    allowed = (offset >= 0) & (offset < kernel_size)
    rel = (halo[:, None, :] - query[:, :, None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
    return halo, allowed, rel


def _traced_tile_bias(rpb: torch.Tensor | None, tiling_h, tiling_w, dtype) -> torch.Tensor:
    """Additive bias (heads or 1, nTh, nTw, Th*Tw, Hh*Hw): RPB where allowed, -inf elsewhere."""
    _, allowed_h, rel_h = tiling_h
    _, allowed_w, rel_w = tiling_w
    # index order: (tile_h, tile_w, query_h, query_w, key_h, key_w)
    allowed = allowed_h[:, None, :, None, :, None] & allowed_w[None, :, None, :, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
    if rpb is None:
        bias = mask[None]
    else:
        bias = rpb[:, rel_h[:, None, :, None, :, None], rel_w[None, :, None, :, None, :]].to(dtype) + mask
    heads, n_h, n_w, t_h, t_w, k_h, k_w = bias.shape
    return bias.reshape(heads, n_h, n_w, t_h * t_w, k_h * k_w)


def _traced_na_tiled(q, k, v, kernel_size: Pair, rpb, scale: float, tile: int) -> torch.Tensor:
    """Undilated NA on (B, h, G, L1, L2, D); G is an extra batch axis (dilation groups)."""
    batch, heads, groups, len_h, len_w, dim = q.shape
    tile_h, tile_w = min(tile, len_h), min(tile, len_w)
    tiling_h = _traced_axis_tiling(len_h, kernel_size[0], tile_h, q.device)
    tiling_w = _traced_axis_tiling(len_w, kernel_size[1], tile_w, q.device)
    halo_h, halo_w = tiling_h[0], tiling_w[0]
    n_h, n_w = halo_h.shape[0], halo_w.shape[0]

    # queries: pad to whole tiles, then (B, h, G, nTh, nTw, Th*Tw, D)
    q = F.pad(q, (0, 0, 0, n_w * tile_w - len_w, 0, n_h * tile_h - len_h))
    q = q.view(batch, heads, groups, n_h, tile_h, n_w, tile_w, dim).transpose(4, 5)
    q = q.reshape(batch, heads, groups, n_h, n_w, tile_h * tile_w, dim)

    # keys and values: each tile's halo, (B, h, G, nTh, nTw, Hh*Hw, D)
    def halo_of(x):
        x = x[:, :, :, halo_h[:, :, None, None], halo_w[None, None, :, :]]  # (B,h,G,nTh,Hh,nTw,Hw,D)
        return x.transpose(4, 5).flatten(5, 6)

    k, v = halo_of(k), halo_of(v)
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    bias = _traced_tile_bias(rpb, tiling_h, tiling_w, compute_dtype)[None, :, None]  # (1, h|1, 1, nTh, nTw, TT, HH)
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).to(compute_dtype) + bias
    weights = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(weights, v)  # (B, h, G, nTh, nTw, Th*Tw, D)

    out = out.view(batch, heads, groups, n_h, n_w, tile_h, tile_w, dim).transpose(4, 5)
    out = out.reshape(batch, heads, groups, n_h * tile_h, n_w * tile_w, dim)
    return out[:, :, :, :len_h, :len_w]


def _na2d_traceable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Pair, dilation: Pair,
                    rpb: torch.Tensor | None = None, scale: float | None = None, tile: int = 8) -> torch.Tensor:
    """The fused op in plain differentiable ops (gathers, index_put), for torch.compile / torch.export: no
    custom autograd Function, no chunk loop over the batch (which would fix the batch size), no in-place
    softmax. Same semantics, slower in eager."""
    batch, heads, height, width, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    if dilation == (1, 1):
        return _traced_na_tiled(q[:, :, None], k[:, :, None], v[:, :, None], kernel_size, rpb, scale, tile)[:, :, 0]

    out = q.new_zeros(height, width, batch, heads, dim)
    for rows in _traced_dilation_groups(height, dilation[0], q.device):
        for cols in _traced_dilation_groups(width, dilation[1], q.device):
            # (B, h, Lh, nh, Lw, nw, D) -> (B, h, nh*nw, Lh, Lw, D): each group an undilated map
            index = (slice(None), slice(None), rows[:, :, None, None], cols[None, None, :, :])
            len_h, n_h = rows.shape
            len_w, n_w = cols.shape

            def to_groups(x):
                return x[index].permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, heads, n_h * n_w, len_h, len_w, dim)

            part = _traced_na_tiled(to_groups(q), to_groups(k), to_groups(v), kernel_size, rpb, scale, tile)
            part = part.view(batch, heads, n_h, n_w, len_h, len_w, dim).permute(4, 2, 5, 3, 0, 1, 6)
            out = out.index_put((rows[:, :, None, None], cols[None, None, :, :]), part)
    return out.permute(2, 3, 0, 1, 4)


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Pair, dilation: Pair,
         rpb: torch.Tensor | None = None, scale: float | None = None,
         tile: int | tuple[int | None, int | None] | None = None) -> torch.Tensor:
    """Fused neighborhood attention: softmax(q k^T * scale + rpb) v over each query's window.

    Returns (B, heads, H, W, D) as a view of a (B, H, W, heads, D) tensor, so that merging heads back into
    channels is free. `tile` forces the query tile size, one int or (rows, cols) (default: chosen per axis
by `plan_axis`).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tile = tuple(tile) if isinstance(tile, (tuple, list)) else (tile, tile)
    if torch.compiler.is_compiling():
        return _na2d_traceable(q, k, v, tuple(kernel_size), tuple(dilation), rpb=rpb, scale=scale)
    return _NeighborhoodAttention.apply(q, k, v, rpb, tuple(kernel_size), tuple(dilation), scale, tile)


def check_can_run(height: int, width: int, kernel_size: Pair, dilation: Pair) -> None:
    """Raise ValueError if a (height, width) map cannot hold the dilated window."""
    for axis, length, ks, dil in (("height", height, kernel_size[0], dilation[0]),
                                  ("width", width, kernel_size[1], dilation[1])):
        if length < ks * dil:
            raise ValueError(
                f"neighborhood attention needs {axis} >= kernel_size * dilation = {ks} * {dil} = {ks * dil}, "
                f"got {length}; pad the input first (DinatLayer does this automatically)")


__all__ = ["na2d", "na2d_qk", "na2d_av", "window_indices", "check_can_run"]
