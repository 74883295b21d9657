"""The neighborhood-attention op layer: `na2d` (fused) and the unfused pair `na2d_qk` / `na2d_av`.

Layout is heads-first, as NATTEN 0.17: q, k, v are (batch, heads, height, width, head_dim); attention
weights are (batch, heads, height, width, kernel_size ** 2); rpb is (heads, 2K - 1, 2K - 1).

`na2d` runs on one of several backends ("torch", "flex", "natten"; see `dispatch`), chosen per call or
forced with `use_backend(name)` / the `backend` argument. The unfused pair always runs in pure PyTorch (`unfused`).
"""

from __future__ import annotations

import torch

from . import dispatch, torch_backend, unfused
from .dispatch import BACKENDS, use_backend
from .linear import linear
from .plan import check_can_run

IntOrPair = int | tuple[int, int]


def _pair(value: IntOrPair, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(x, int) for x in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _check(q: torch.Tensor, kernel_size: IntOrPair, dilation: IntOrPair, rpb, others=()):
    kernel_size, dilation = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
    if any(ks < 1 or ks % 2 == 0 for ks in kernel_size):
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    if any(d < 1 for d in dilation):
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if q.dim() != 5:
        raise ValueError(f"expected (batch, heads, height, width, head_dim) tensors, got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"neighborhood attention needs floating-point tensors, got {q.dtype}")
    for name, other in others:
        if other.shape[:4] != q.shape[:4]:
            raise ValueError(f"{name} shape {tuple(other.shape)} does not match query shape {tuple(q.shape)}")
    if rpb is not None:
        expected = (q.shape[1], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
        if tuple(rpb.shape) != expected:
            raise ValueError(f"rpb must have shape {expected} (heads, 2K-1, 2K-1), got {tuple(rpb.shape)}")
    check_can_run(q.shape[2], q.shape[3], kernel_size, dilation)
    return kernel_size, dilation


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1,
         rpb: torch.Tensor | None = None, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Fused 2-D (dilated) neighborhood attention: (B, heads, H, W, D) -> (B, heads, H, W, D).

    `scale` defaults to head_dim ** -0.5; `rpb` (heads, 2K-1, 2K-1) is added to the scores before softmax.
    `backend` ("auto", "torch", "flex", "natten") forces a backend unless `use_backend` overrides it; a
    backend that cannot run the call raises a ValueError saying why.
    """
    kernel_size, dilation = _check(q, kernel_size, dilation, rpb, (("key", k), ("value", v)))
    if torch.compiler.is_compiling():
        # traced (torch.compile / export): no context variable or logging; the config's choice, else the
        # fastest backend that traces into the graph
        name = dispatch.choose_traced(backend, q, rpb is not None)
    else:
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, rpb))
        name = dispatch.choose(backend, q, rpb is not None, needs_grad, kernel_size, dilation)
    module = torch_backend if name == "torch" else dispatch.backend(name)
    return module.na2d(q, k, v, kernel_size, dilation, rpb=rpb, scale=scale)


def na2d_qk(q: torch.Tensor, k: torch.Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1,
            rpb: torch.Tensor | None = None) -> torch.Tensor:
    """Attention scores q . k (+ rpb) of each query against its window: (B, heads, H, W, K*K).

    q is used as given: scale it before the call, as NATTEN 0.17 does.
    """
    kernel_size, dilation = _check(q, kernel_size, dilation, rpb, (("key", k),))
    return unfused.na2d_qk(q, k, kernel_size, dilation, rpb=rpb)


def na2d_av(weights: torch.Tensor, v: torch.Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1) -> torch.Tensor:
    """Attention weights (B, heads, H, W, K*K) applied to each query's window of values: (B, heads, H, W, D)."""
    kernel_size, dilation = _check(v, kernel_size, dilation, None)
    if weights.shape[:4] != v.shape[:4] or weights.shape[4] != kernel_size[0] * kernel_size[1]:
        raise ValueError(f"weights shape {tuple(weights.shape)} does not match values {tuple(v.shape)} "
                         f"with kernel_size {kernel_size}")
    return unfused.na2d_av(weights, v, kernel_size, dilation)


__all__ = ["na2d", "na2d_qk", "na2d_av", "use_backend", "BACKENDS", "linear"]
