"""Neighborhood attention through NATTEN, imported only when this backend runs.

NATTEN >= 0.20: `natten.na2d` (fused; no RPB), heads-last layout (B, H, W, heads, D).
NATTEN <= 0.17: the RPB ops `natten.functional.na2d_qk(q, k, kernel_size, dilation, rpb=...)` and
`na2d_av(attn, v, kernel_size, dilation)`, heads-first layout, as transformers 4.46's DiNAT calls them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging

import torch

from . import flex_backend

Pair = tuple[int, int]
logger = logging.getLogger("dinat.ops")


@functools.lru_cache(maxsize=None)
def natten_version() -> tuple[int, ...] | None:
    """NATTEN's version as a tuple, or None when it is not installed or does not import."""
    try:
        if importlib.util.find_spec("natten") is None:
            return None
    except (ImportError, ValueError):  # a finder that refuses it: treat as absent
        return None
    try:
        natten = importlib.import_module("natten")
    except Exception as err:  # a broken install is "not available", with the reason logged
        logger.debug("natten is installed but does not import: %s", err)
        return None
    version = getattr(natten, "__version__", "0")
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def natten_label() -> str:
    version = natten_version()
    return "not installed" if version is None else "NATTEN " + ".".join(map(str, version))


def can_run(q: torch.Tensor, has_rpb: bool, needs_grad: bool) -> str | None:
    """Whether the installed NATTEN can run a fused call: NATTEN <= 0.17's RPB ops run every call; NATTEN >= 0.20
    has no RPB, and on CPU runs only where flex attention does, for power-of-two head_dim in [8, 512].

    Args:
        q: the call's queries (B, heads, H, W, D); their device, dtype and head_dim decide.
        has_rpb: whether the call adds a relative positional bias.
        needs_grad: whether the call needs a backward.

    Returns:
        None if it can, else the reason it cannot (shown in the error when the backend was forced).
    """
    version = natten_version()
    if version is None:
        return "NATTEN is not installed (pip install natten)"
    if version >= (0, 20):
        if has_rpb:
            return (f"{natten_label()} has no relative positional bias (RPB); build the model with "
                    "use_rpb=False, or install NATTEN <= 0.17 for its RPB ops")
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"{natten_label()} does not support {q.dtype}"
        if q.device.type == "cpu":
            flex_reason = flex_backend.can_run(q, has_rpb, needs_grad)
            if flex_reason is not None:
                return f"{natten_label()} runs on CPU through flex attention, and {flex_reason}"
            head_dim = q.shape[-1]
            if not (8 <= head_dim <= 512 and head_dim & (head_dim - 1) == 0):
                return f"{natten_label()} on CPU needs a power-of-two head_dim in [8, 512], got {head_dim}"
        return None
    if version >= (0, 17):
        return None  # the legacy na2d_qk / na2d_av ops, with RPB
    return f"{natten_label()} is too old (need 0.17.x for RPB, or >= 0.20)"


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


__all__ = ["can_run", "natten_version", "natten_label", "na2d"]
