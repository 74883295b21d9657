"""The unfused pair `na2d_qk` / `na2d_av`: each query's window of keys (or values) gathered, as NATTEN 0.17's
ops of the same names. Used where the attention weights themselves are needed (output_attentions, attention
dropout); slower and heavier than the fused op (it materializes K*K keys per query).

Tensors are heads-first: q, k, v (batch, heads, height, width, head_dim); weights (batch, heads, height,
width, kernel_h * kernel_w), keys in row-major window order; rpb (heads, 2 * kernel_h - 1, 2 * kernel_w - 1).
"""

from __future__ import annotations

import torch

from .plan import window_indices

Pair = tuple[int, int]


def _windows(x: torch.Tensor, kernel_size: Pair, dilation: Pair):
    """(keys_h, rel_h, keys_w, rel_w): key positions and RPB offsets of every query's window along H and W."""
    _, _, height, width, _ = x.shape
    keys_h, rel_h = window_indices(height, kernel_size[0], dilation[0], x.device)
    keys_w, rel_w = window_indices(width, kernel_size[1], dilation[1], x.device)
    return keys_h, rel_h, keys_w, rel_w


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
    keys_h, rel_h, keys_w, rel_w = _windows(q, kernel_size, dilation)
    k_nb = _gather_neighbors(k, keys_h, keys_w)
    scores = torch.einsum("bhxyd,bhxyijd->bhxyij", q, k_nb).flatten(-2)
    if rpb is not None:
        scores = scores + _rpb_bias(rpb, rel_h, rel_w).to(scores.dtype)
    return scores


def na2d_av(weights: torch.Tensor, v: torch.Tensor, kernel_size: Pair, dilation: Pair) -> torch.Tensor:
    """Weights (B, h, H, W, Kh*Kw) times each query's window of values: (B, h, H, W, D)."""
    keys_h, _, keys_w, _ = _windows(v, kernel_size, dilation)
    v_nb = _gather_neighbors(v, keys_h, keys_w)
    weights = weights.unflatten(-1, kernel_size)
    return torch.einsum("bhxyij,bhxyijd->bhxyd", weights.to(v.dtype), v_nb)


__all__ = ["na2d_qk", "na2d_av"]
