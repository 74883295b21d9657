"""Neighborhood attention in pure PyTorch: the reference backend, and the default where nothing faster applies.

Tensors are heads-first, as in NATTEN 0.17's `na2d_qk` / `na2d_av`:
    q, k, v:  (batch, heads, height, width, head_dim)
    weights:  (batch, heads, height, width, kernel_h * kernel_w), keys in row-major window order
    rpb:      (heads, 2 * kernel_h - 1, 2 * kernel_w - 1)

Semantics (NATTEN 0.17): an axis of length L with dilation d splits into d interleaved groups
(positions i with i % d == g). Each group is an ordinary axis of length ceil((L - g) / d) on which
the window of K keys is clamped to stay inside, so every query sees exactly K keys per axis.
"""

from __future__ import annotations

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
# Fused path: dense attention of query tiles against their key halo, per dilation group.
# Memory and cost stay linear in H*W; K and V are gathered about ((T + K - 1) / T)^2 times, not K*K.
# ---------------------------------------------------------------------------------------------

def _dilation_groups(length: int, dilation: int, device) -> list[torch.Tensor]:
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


def _axis_tiling(length: int, kernel_size: int, tile: int, device):
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


def _tile_bias(rpb: torch.Tensor | None, tiling_h, tiling_w, dtype) -> torch.Tensor:
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


def _na_tiled(q, k, v, kernel_size: Pair, rpb, scale: float, tile: int) -> torch.Tensor:
    """Undilated NA on (B, h, G, L1, L2, D); G is an extra batch axis (dilation groups)."""
    batch, heads, groups, len_h, len_w, dim = q.shape
    tile_h, tile_w = min(tile, len_h), min(tile, len_w)
    tiling_h = _axis_tiling(len_h, kernel_size[0], tile_h, q.device)
    tiling_w = _axis_tiling(len_w, kernel_size[1], tile_w, q.device)
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
    bias = _tile_bias(rpb, tiling_h, tiling_w, compute_dtype)[None, :, None]  # (1, h|1, 1, nTh, nTw, TT, HH)
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).to(compute_dtype) + bias
    weights = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(weights, v)  # (B, h, G, nTh, nTw, Th*Tw, D)

    out = out.view(batch, heads, groups, n_h, n_w, tile_h, tile_w, dim).transpose(4, 5)
    out = out.reshape(batch, heads, groups, n_h * tile_h, n_w * tile_w, dim)
    return out[:, :, :, :len_h, :len_w]


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Pair, dilation: Pair,
         rpb: torch.Tensor | None = None, scale: float | None = None, tile: int = 8) -> torch.Tensor:
    """Fused neighborhood attention: softmax(q k^T * scale + rpb) v over each query's window."""
    batch, heads, height, width, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    if dilation == (1, 1):
        return _na_tiled(q[:, :, None], k[:, :, None], v[:, :, None], kernel_size, rpb, scale, tile)[:, :, 0]

    out = q.new_zeros(height, width, batch, heads, dim)
    for rows in _dilation_groups(height, dilation[0], q.device):
        for cols in _dilation_groups(width, dilation[1], q.device):
            # (B, h, Lh, nh, Lw, nw, D) -> (B, h, nh*nw, Lh, Lw, D): each group an undilated map
            index = (slice(None), slice(None), rows[:, :, None, None], cols[None, None, :, :])
            len_h, n_h = rows.shape
            len_w, n_w = cols.shape

            def to_groups(x):
                return x[index].permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, heads, n_h * n_w, len_h, len_w, dim)

            part = _na_tiled(to_groups(q), to_groups(k), to_groups(v), kernel_size, rpb, scale, tile)
            part = part.view(batch, heads, n_h, n_w, len_h, len_w, dim).permute(4, 2, 5, 3, 0, 1, 6)
            out = out.index_put((rows[:, :, None, None], cols[None, None, :, :]), part)
    return out.permute(2, 3, 0, 1, 4)


def check_can_run(height: int, width: int, kernel_size: Pair, dilation: Pair) -> None:
    """Raise ValueError if a (height, width) map cannot hold the dilated window."""
    for axis, length, ks, dil in (("height", height, kernel_size[0], dilation[0]),
                                  ("width", width, kernel_size[1], dilation[1])):
        if length < ks * dil:
            raise ValueError(
                f"neighborhood attention needs {axis} >= kernel_size * dilation = {ks} * {dil} = {ks * dil}, "
                f"got {length}; pad the input first (DinatLayer does this automatically)")


__all__ = ["na2d", "na2d_qk", "na2d_av", "window_indices", "check_can_run"]
