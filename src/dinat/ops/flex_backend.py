"""Neighborhood attention as torch's `flex_attention`: a block-sparse mask for the (dilated, clamped)
windows, and the RPB added by a score modification (flex differentiates through it, RPB included).

Tokens are the H*W positions in row-major order. On CUDA the call is compiled (`torch.compile`), which is
what makes flex fast; elsewhere it runs eagerly, which materializes all (H*W)^2 scores: correct, for
testing, not fast. torch (2.13) has no flex backward on CPU.
"""

from __future__ import annotations

import functools

import torch

from .plan import window_start

Pair = tuple[int, int]


@functools.lru_cache(maxsize=None)
def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception:
        return False
    return True


def can_run(q: torch.Tensor, has_rpb: bool, needs_grad: bool) -> str | None:
    """Whether torch's flex attention can run a fused call.

    Args:
        q: the call's queries (B, heads, H, W, D); their device, dtype and head_dim decide.
        has_rpb: whether the call adds a relative positional bias (flex always can).
        needs_grad: whether the call needs a backward.

    Returns:
        None if it can, else the reason it cannot (shown in the error when the backend was forced).
    """
    if not flex_available():
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
    if needs_grad and q.device.type == "cpu":
        return f"torch {torch.__version__} has no flex-attention backward on CPU"
    if q.device.type == "cuda" and q.shape[-1] < 16:
        return f"compiled flex attention needs head_dim >= 16, got {q.shape[-1]}"
    return None


def _window_test(query, key, length: int, kernel_size: int, dilation: int):
    """Per axis: is `key` in the clamped window of `query` (NATTEN semantics), and their RPB index."""
    group = query % dilation
    same_group = group == key % dilation
    group_length = (length - group + dilation - 1) // dilation
    query_in_group, key_in_group = query // dilation, key // dilation
    start = window_start(query_in_group, group_length, kernel_size)
    inside = same_group & (key_in_group >= start) & (key_in_group < start + kernel_size)
    rel = torch.clamp(key_in_group - query_in_group + kernel_size - 1, 0, 2 * kernel_size - 2)
    return inside, rel


def _mods(height: int, width: int, kernel_size: Pair, dilation: Pair, rpb: torch.Tensor | None):
    def mask_mod(b, h, q_idx, kv_idx):
        inside_h, _ = _window_test(q_idx // width, kv_idx // width, height, kernel_size[0], dilation[0])
        inside_w, _ = _window_test(q_idx % width, kv_idx % width, width, kernel_size[1], dilation[1])
        return inside_h & inside_w

    if rpb is None:
        return mask_mod, None

    def score_mod(score, b, h, q_idx, kv_idx):
        _, rel_h = _window_test(q_idx // width, kv_idx // width, height, kernel_size[0], dilation[0])
        _, rel_w = _window_test(q_idx % width, kv_idx % width, width, kernel_size[1], dilation[1])
        return score + rpb[h, rel_h, rel_w].to(score.dtype)

    return mask_mod, score_mod


@functools.lru_cache(maxsize=64)
def _block_mask(height: int, width: int, kernel_size: Pair, dilation: Pair, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod, _ = _mods(height, width, kernel_size, dilation, None)
    tokens = height * width
    # cached across calls: a mask made under inference_mode must still serve a later training step
    with torch.inference_mode(False):
        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=tokens, KV_LEN=tokens, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Pair, dilation: Pair,
         rpb: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """(B, heads, H, W, D) in and out."""
    from torch.nn.attention.flex_attention import flex_attention

    batch, heads, height, width, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    _, score_mod = _mods(height, width, kernel_size, dilation, rpb)
    block_mask = _block_mask(height, width, tuple(kernel_size), tuple(dilation), str(q.device))
    # inside a compiled graph flex attention is compiled with it
    run = _compiled_flex() if q.device.type == "cuda" and not torch.compiler.is_compiling() else flex_attention
    dtype = q.dtype if q.dtype == v.dtype else torch.promote_types(q.dtype, v.dtype)
    q, k, v = (x.to(dtype).reshape(batch, heads, height * width, dim) for x in (q, k, v))
    out = run(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out.view(batch, heads, height, width, dim)


__all__ = ["can_run", "flex_available", "na2d"]
