"""The neighborhood-attention op layer: `na2d` (fused) and the unfused pair `na2d_qk` / `na2d_av`.

Layout is heads-first, as NATTEN 0.17: q, k, v are (batch, heads, height, width, head_dim); attention
weights are (batch, heads, height, width, kernel_size ** 2); rpb is (heads, 2K - 1, 2K - 1).

`na2d` runs on one of several backends ("torch", "cpp", "flex", "natten"; see `dispatch`), chosen per call or
forced with `use_backend(name)` / the `backend` argument. The unfused pair always runs in pure PyTorch (`unfused`).
"""

from __future__ import annotations

import torch

from . import bfloat16, cpp_backend, dispatch, flex_backend, torch_backend, unfused
from .dispatch import BACKENDS, use_backend
from .layer_norm import layer_norm
from .linear import linear
from .plan import check_can_run, needs_grad

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
    """Fused 2-D (dilated) neighborhood attention: each query attends to the kernel_size x kernel_size keys of
    its window (docs/semantics.md), softmax(q . k * scale + rpb) . v, without materializing the weights.

    Args:
        q: queries (B, heads, H, W, D), floating point; H and W at least kernel_size * dilation.
        k: keys, the same shape.
        v: values, the same batch, heads, H and W.
        kernel_size: window size, odd; an int or a (height, width) pair.
        dilation: spacing of the window's keys, >= 1; an int or a (height, width) pair.
        rpb: relative positional bias (heads, 2 * kernel_size - 1, 2 * kernel_size - 1), added to the scores
            before the softmax; None for none.
        scale: factor on the scores; default head_dim ** -0.5.
        backend: "auto" (default) or one of `BACKENDS` to force it; a `use_backend` block overrides it.

    Returns:
        (B, heads, H, W, D) attention output.

    Raises:
        ValueError: bad shapes, kernel size or dilation, or a forced backend that cannot run the call (the
            message says why).
    """
    kernel_size, dilation = _check(q, kernel_size, dilation, rpb, (("key", k), ("value", v)))
    module = _backend_module(backend, q, rpb, (q, k, v), kernel_size, dilation)
    return module.na2d(q, k, v, kernel_size, dilation, rpb=rpb, scale=scale)


def na2d_packed(qkv: torch.Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1, rpb: torch.Tensor | None = None,
                scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """`na2d` on queries, keys and values packed in one projection's output, as DiNAT's layers make them.

    Args:
        qkv: (B, H, W, 3, heads, D): q, k and v along the fourth dimension; H and W at least kernel_size * dilation.
        kernel_size: window size, odd; an int or a (height, width) pair.
        dilation: spacing of the window's keys, >= 1; an int or a (height, width) pair.
        rpb: relative positional bias (heads, 2 * kernel_size - 1, 2 * kernel_size - 1); None for none.
        scale: factor on the scores; default head_dim ** -0.5.
        backend: "auto" (default) or one of `BACKENDS` to force it; a `use_backend` block overrides it.

    Returns:
        (B, heads, H, W, D) attention output, as `na2d`'s. Backends that take the packed tensor (those with their own
        `na2d_packed`: cpp) return its gradient in the packed layout, without copying it together from three views.

    Raises:
        ValueError: as `na2d`, or a tensor that is not (B, H, W, 3, heads, D).
    """
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"expected a packed (batch, height, width, 3, heads, head_dim) tensor, got {tuple(qkv.shape)}")
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
    kernel_size, dilation = _check(q, kernel_size, dilation, rpb)
    module = _backend_module(backend, q, rpb, (qkv,), kernel_size, dilation)
    # a backend may take the packed tensor itself (its own `na2d_packed`); the others get its three views
    packed = getattr(module, "na2d_packed", None)
    if packed is not None:
        return packed(qkv, kernel_size, dilation, rpb=rpb, scale=scale)
    return module.na2d(q, k, v, kernel_size, dilation, rpb=rpb, scale=scale)


def _backend_module(backend, q, rpb, inputs, kernel_size, dilation):
    """The module of the backend that runs a call on `inputs` (and `rpb`)."""
    if torch.compiler.is_compiling():
        # traced (torch.compile / export): no context variable or logging; the config's choice, else the
        # fastest backend that traces into the graph
        name = dispatch.choose_traced(backend, q)
    else:
        name = dispatch.choose(backend, q, rpb is not None, needs_grad(*inputs, rpb), kernel_size, dilation)
    # the modules already imported are used directly: a compiled graph cannot trace importlib
    return {"torch": torch_backend, "cpp": cpp_backend, "flex": flex_backend}.get(name) or dispatch.backend(name)


def na2d_qk(q: torch.Tensor, k: torch.Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1,
            rpb: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused first half: scores of each query against the keys of its window, as NATTEN 0.17's `na2d_qk`.

    Args:
        q: queries (B, heads, H, W, D), used as given (scale them before the call, as NATTEN 0.17 does).
        k: keys, the same shape.
        kernel_size: window size, odd; an int or a (height, width) pair.
        dilation: spacing of the window's keys, >= 1; an int or a (height, width) pair.
        rpb: relative positional bias (heads, 2 * kernel_size - 1, 2 * kernel_size - 1) added to the scores;
            None for none.

    Returns:
        Scores (B, heads, H, W, kernel_h * kernel_w), the window's keys in row-major order.
    """
    kernel_size, dilation = _check(q, kernel_size, dilation, rpb, (("key", k),))
    return unfused.na2d_qk(q, k, kernel_size, dilation, rpb=rpb)


def na2d_av(weights: torch.Tensor, v: torch.Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1) -> torch.Tensor:
    """The unfused second half: weights applied to each query's window of values, as NATTEN 0.17's `na2d_av`.

    Args:
        weights: attention weights (B, heads, H, W, kernel_h * kernel_w), as `na2d_qk` lays them out.
        v: values (B, heads, H, W, D).
        kernel_size: window size, odd; an int or a (height, width) pair.
        dilation: spacing of the window's keys, >= 1; an int or a (height, width) pair.

    Returns:
        (B, heads, H, W, D): for each query, its weights times its window's values.
    """
    kernel_size, dilation = _check(v, kernel_size, dilation, None)
    if weights.shape[:4] != v.shape[:4] or weights.shape[4] != kernel_size[0] * kernel_size[1]:
        raise ValueError(f"weights shape {tuple(weights.shape)} does not match values {tuple(v.shape)} "
                         f"with kernel_size {kernel_size}")
    return unfused.na2d_av(weights, v, kernel_size, dilation)


__all__ = ["na2d", "na2d_packed", "na2d_qk", "na2d_av", "use_backend", "BACKENDS", "linear", "layer_norm"]
