"""Which backend runs a neighborhood-attention call, and why.

Backends:
    torch   pure PyTorch (tiled dense attention per dilation group); runs everywhere, the default on CPU.
    flex    torch's `flex_attention` with a block-sparse neighborhood mask and the RPB as a score modification;
            compiled on CUDA, eager elsewhere (eager materializes all scores: for tests, not for speed).
    natten  NATTEN's kernels: `natten.na2d` (NATTEN >= 0.20) for layers without RPB, or NATTEN's own
            `na2d_qk` / `na2d_av` RPB ops when NATTEN <= 0.17 is installed.

The choice is made per call from the device, dtype, RPB and shape, unless a backend is forced by
`use_backend(...)` (a context manager; wins) or by the model config's `na_backend`. Forcing a backend that
cannot run raises a ValueError that says why. The reason for every choice is logged at debug level on the
`dinat.ops` logger. NATTEN is imported only when it is asked about.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger("dinat.ops")

BACKENDS = ("torch", "flex", "natten")
CHOICES = ("auto",) + BACKENDS

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("dinat_na_backend", default=None)


def validate_backend_name(name: str, what: str = "backend") -> str:
    if name not in CHOICES:
        raise ValueError(f"unknown neighborhood-attention {what} {name!r}; choose one of {list(CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for every neighborhood-attention call inside the block ("auto" restores the choice).

    >>> with dinat.ops.use_backend("torch"):
    ...     logits = model(pixel_values).logits
    """
    token = _forced.set(validate_backend_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by an enclosing `use_backend`, or None."""
    name = _forced.get()
    return None if name in (None, "auto") else name


# -- what is installed ------------------------------------------------------------------------------
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


@functools.lru_cache(maxsize=None)
def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception:
        return False
    return True


# -- can a backend run this call? ---------------------------------------------------------------------
def why_not(name: str, q: torch.Tensor, has_rpb: bool, needs_grad: bool) -> str | None:
    """None if backend `name` can run this call, else the reason it cannot."""
    if name == "torch":
        return None
    flex_reason = None
    if not flex_available():
        flex_reason = f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
    elif needs_grad and q.device.type == "cpu":
        flex_reason = f"torch {torch.__version__} has no flex-attention backward on CPU"
    if name == "flex":
        return flex_reason
    if name == "natten":
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
                if flex_reason is not None:
                    return f"{natten_label()} runs on CPU through flex attention, and {flex_reason}"
                head_dim = q.shape[-1]
                if not (8 <= head_dim <= 512 and head_dim & (head_dim - 1) == 0):
                    return f"{natten_label()} on CPU needs a power-of-two head_dim in [8, 512], got {head_dim}"
            return None
        if version >= (0, 17):
            return None  # the legacy na2d_qk / na2d_av ops, with RPB
        return f"{natten_label()} is too old (need 0.17.x for RPB, or >= 0.20)"
    raise ValueError(f"unknown neighborhood-attention backend {name!r}; choose one of {list(BACKENDS)}")


def choose(requested: str | None, q: torch.Tensor, has_rpb: bool, needs_grad: bool,
           kernel_size: tuple[int, int], dilation: tuple[int, int]) -> str:
    """The backend for one fused call: forced (context manager, then `requested`) or automatic."""
    forced = forced_backend() or (None if requested in (None, "auto") else validate_backend_name(requested))
    if forced is not None:
        reason = why_not(forced, q, has_rpb, needs_grad)
        if reason is not None:
            raise ValueError(f"neighborhood-attention backend {forced!r} cannot run this call: {reason}")
        logger.debug("na2d: backend %s (forced)", forced)
        return forced
    name, reason = _automatic(q, has_rpb, needs_grad)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("na2d %s %s rpb=%s grad=%s kernel=%s dilation=%s: backend %s (%s)", tuple(q.shape),
                     q.dtype, has_rpb, needs_grad, kernel_size, dilation, name, reason)
    return name


def _automatic(q: torch.Tensor, has_rpb: bool, needs_grad: bool) -> tuple[str, str]:
    if q.device.type != "cuda":
        # measured on CPU: NATTEN >= 0.20 runs through uncompiled flex attention there (seconds per call),
        # and eager flex materializes every score; the tiled torch path is the fastest
        return "torch", f"on {q.device.type} the tiled torch path is the fastest"
    natten_reason = why_not("natten", q, has_rpb, needs_grad)
    if natten_reason is None:
        return "natten", f"{natten_label()} kernels on CUDA"
    flex_reason = why_not("flex", q, has_rpb, needs_grad)
    if flex_reason is None:
        return "flex", f"compiled flex attention on CUDA (natten: {natten_reason})"
    return "torch", f"no faster backend on CUDA (natten: {natten_reason}; flex: {flex_reason})"


__all__ = ["BACKENDS", "CHOICES", "use_backend", "forced_backend", "choose", "why_not", "natten_version",
           "flex_available", "validate_backend_name"]
