"""Which backend runs a neighborhood-attention call, and why.

Backends:
    torch   pure PyTorch (tiled dense attention per dilation group); runs everywhere: the reference, and the
            default where nothing faster can run.
    cpp     a C++ CPU kernel, compiled on first use (`cpp_backend`); the default on CPU where it builds.
    flex    torch's `flex_attention` with a block-sparse neighborhood mask and the RPB as a score modification;
            compiled on CUDA, eager elsewhere (eager materializes all scores: for tests, not for speed).
    natten  NATTEN's kernels: `natten.na2d` (NATTEN >= 0.20) for layers without RPB, or NATTEN's own
            `na2d_qk` / `na2d_av` RPB ops when NATTEN <= 0.17 is installed.

Each backend is a module that owns `can_run(q, has_rpb, needs_grad)` (None, or the reason it cannot run the
call) and its entry point `na2d`; this module walks them (as NATTEN's backends and their checks). The choice
is made per call from the device, dtype, RPB and shape, unless a backend is forced by `use_backend(...)` (a
context manager; wins) or by the model config's `na_backend`. Forcing a backend that cannot run raises a
ValueError that says why. The reason for every choice is logged at debug level on the
`dinat.ops` logger. NATTEN is imported only when it is asked about.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
from collections.abc import Iterator

import torch

from . import cpp_backend
from .plan import is_exporting

logger = logging.getLogger("dinat.ops")

_MODULES = {"torch": "torch_backend", "cpp": "cpp_backend", "flex": "flex_backend", "natten": "natten_backend"}
BACKENDS = tuple(_MODULES)
CHOICES = ("auto",) + BACKENDS

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("dinat_na_backend", default=None)


def validate_backend_name(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"unknown neighborhood-attention backend {name!r}; choose one of {list(CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for every fused neighborhood-attention call inside the block (a context manager).

    Overrides the model config's `na_backend` and `na2d`'s `backend` argument; blocks nest, the innermost wins.

    Args:
        name: "torch", "cpp", "flex" or "natten"; "auto" lifts an outer block's forcing (the `backend` argument or the
            config's `na_backend`, else the automatic choice, applies again).

    Yields:
        None. Inside the block, a call the forced backend cannot run raises a ValueError saying why.

    Raises:
        ValueError: an unknown backend name.

    Example:
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


def backend(name: str):
    """The module of backend `name` (imported on first use; NATTEN itself only when asked about)."""
    if name not in _MODULES:
        raise ValueError(f"unknown neighborhood-attention backend {name!r}; choose one of {list(BACKENDS)}")
    return importlib.import_module(f".{_MODULES[name]}", __package__)


def why_not(name: str, q: torch.Tensor, has_rpb: bool, needs_grad: bool) -> str | None:
    """None if backend `name` can run this call, else the reason it cannot."""
    return backend(name).can_run(q, has_rpb, needs_grad)


def natten_version() -> tuple[int, ...] | None:
    return backend("natten").natten_version()


def flex_available() -> bool:
    return backend("flex").flex_available()


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


def choose_traced(requested: str | None, q: torch.Tensor) -> str:
    """The backend for a call being traced (torch.compile, torch.export): the requested one; else on CPU under
    torch.compile the C++ kernel where it builds (one custom op in the graph), and otherwise torch (the tiled
    kernel as one custom op, or plain ops that inductor fuses on GPUs and that exporters translate). Flex
    attention is not chosen automatically: in a compiled DiNAT-mini on an H100 it ran at 0.3x the plain ops."""
    if requested not in (None, "auto"):
        return validate_backend_name(requested)
    if q.device.type == "cpu" and not is_exporting() and cpp_backend.unavailable_reason() is None:
        return "cpp"
    return "torch"


# walked in this order on CUDA, then torch. Elsewhere the tiled torch path: NATTEN >= 0.20 runs on CPU through
# uncompiled flex attention, and eager flex materializes all (H*W)^2 scores. Flex is not chosen on CUDA either: a
# model's layers need more compiled variants than dynamo keeps (recompile limit 8), and on an H100 DiNAT-mini ran
# 5x slower with it than with torch (docs/performance.md, "GPU check")
_PREFERENCE_ON_CUDA = ("natten",)


def _automatic(q: torch.Tensor, has_rpb: bool, needs_grad: bool) -> tuple[str, str]:
    if q.device.type == "cpu":
        reason = why_not("cpp", q, has_rpb, needs_grad)
        return ("cpp", "the C++ kernel is the fastest on CPU") if reason is None else ("torch", f"cpp: {reason}")
    if q.device.type != "cuda":
        return "torch", f"on {q.device.type} the tiled torch path is the fastest"
    reasons = []
    for name in _PREFERENCE_ON_CUDA:
        reason = why_not(name, q, has_rpb, needs_grad)
        if reason is None:
            return name, "the first that can run on CUDA" + (f" ({'; '.join(reasons)})" if reasons else "")
        reasons.append(f"{name}: {reason}")
    return "torch", f"no faster backend on CUDA ({'; '.join(reasons)})"


__all__ = ["BACKENDS", "CHOICES", "use_backend", "forced_backend", "choose", "why_not", "natten_version",
           "flex_available", "validate_backend_name", "backend"]
