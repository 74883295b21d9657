"""The cpp backend: a C++ CPU kernel (`csrc/na2d_cpu.cpp`) that reads each query's keys in place, with AVX-512
vector code where the CPU has it; the default on CPU where it builds.

It is compiled (with the inference LayerNorm kernel of `layer_norm.py` and the oneDNN linear epilogue of
`linear.py`, in one extension module) by torch's C++ extension builder the first time it is needed (about a
minute; cached across processes in torch's extension directory) and needs a C++ compiler and ninja; without them,
or with `DINAT_BUILD_KERNELS=0` in the environment, `can_run` says why and the torch backend runs instead.

Its ops, `dinat::na2d_cpp` (separate q, k, v, as DiNAT's layers pass them in inference) and `dinat::na2d_cpp_packed`
(one packed qkv projection, as they pass them in training), have C++ CPU kernels registered with torch's dispatcher
by the extension, so eager calls and compiled graphs reach the kernel without a Python frame; here are their schemas,
fake versions for tracing, FLOP formulas, and their backward ops registered as their autograd formulas. Inputs in
16-bit floats come back in their dtype. They are computed in float32, except that on CPUs with AVX512-BF16 the
fast paths multiply bfloat16 as bfloat16 pairs (float32 sums, probabilities rounded to bfloat16 before they weight
the values).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

from . import plan

Pair = tuple[int, int]

# one extension module: the attention kernel, the inference LayerNorm (ops/layer_norm.py), and the registration of
# these and of the oneDNN linear epilogue (ops/linear.py) as the CPU kernels of their ops
SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("bindings.cpp", "na2d_cpu.cpp", "layer_norm_cpu.cpp"))
# part of the build's name, not compiled alone
HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in ("bfloat16_avx512.h", "sum_lanes_avx512.h"))
BUILD_SWITCH = "DINAT_BUILD_KERNELS"
_COMPUTE_DTYPES = (torch.float32, torch.float64)
_DTYPES = _COMPUTE_DTYPES + (torch.bfloat16, torch.float16)

logger = logging.getLogger("dinat.ops")


STALE_LOCK_SECONDS = 600  # a build takes about a minute here; a lock this old was left by a killed process


def remove_stale_lock(build_directory: Path, max_age: float = STALE_LOCK_SECONDS) -> bool:
    """Remove the build lock a killed process left behind (torch waits on it forever); True if one was removed."""
    lock = build_directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age:
        return False
    logger.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


@functools.cache
def _build():
    """(the compiled extension module, None), or (None, why it could not be built); built once per process."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS)).hexdigest()
    # the name changes with the sources, so a cached build of older sources is never loaded
    name = "dinat_na2d_cpu_" + digest[:12]
    logger.info("building the C++ neighborhood-attention kernel %s (once; cached by torch)", name)
    try:
        remove_stale_lock(Path(cpp_extension._get_build_directory(name, verbose=False)))
        return cpp_extension.load(name, [str(source) for source in SOURCES], extra_cflags=["-O3", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"]), None
    except Exception as error:  # no compiler, no ninja, a failed build: the torch backend runs instead
        reason = f"the C++ kernel could not be built: {type(error).__name__}: {str(error).strip()[:300]}"
        logger.warning("%s; neighborhood attention on CPU runs on the slower torch backend", reason)
        return None, reason


def extension():
    """The compiled extension module; RuntimeError with the reason where it cannot be built."""
    module, reason = _build()
    if module is None:
        raise RuntimeError(reason)
    return module


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """None if the kernel is built (building it if needed), else why it cannot be."""
    if os.environ.get(BUILD_SWITCH, "1") == "0":
        return f"{BUILD_SWITCH}=0 in the environment"
    return _build()[1]


def can_run(q: torch.Tensor, has_rpb: bool, needs_grad: bool) -> str | None:
    """Whether the C++ CPU kernel can run a call.

    Args:
        q: the call's queries (B, heads, H, W, D); their device and dtype decide.
        has_rpb: whether the call adds a relative positional bias (it always can).
        needs_grad: whether the call needs a backward (it always can).

    Returns:
        None if it can, else the reason it cannot (shown in the error when the backend was forced).
    """
    if q.device.type != "cpu":
        return f"it runs on CPU only, not {q.device.type}"
    if q.dtype not in _DTYPES:
        return f"it runs float32, float64, bfloat16 and float16, not {q.dtype}"
    return unavailable_reason()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _COMPUTE_DTYPES else torch.float32


# The ops' CPU kernels are C++ (csrc/bindings.cpp), registered when the extension loads; their schemas, fake
# versions and autograd formulas are here. The output comes back in the inputs' dtype, the probabilities kept for
# backward in the compute dtype (float32 for 16-bit inputs).
_KERNEL_ARGUMENTS = "int[] kernel_size, int[] dilation, float scale"
torch.library.define("dinat::na2d_cpp", "(Tensor q, Tensor k, Tensor v, Tensor? rpb, "
                     f"{_KERNEL_ARGUMENTS}, bool keep_probabilities) -> (Tensor, Tensor)")
torch.library.define("dinat::na2d_cpp_backward", "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor probs, "
                     f"{_KERNEL_ARGUMENTS}, bool want_rpb) -> (Tensor, Tensor)")
torch.library.define("dinat::na2d_cpp_packed", f"(Tensor qkv, Tensor? rpb, {_KERNEL_ARGUMENTS}, "
                     "bool keep_probabilities) -> (Tensor, Tensor)")
torch.library.define("dinat::na2d_cpp_packed_backward", "(Tensor grad_out, Tensor qkv, Tensor probs, "
                     f"{_KERNEL_ARGUMENTS}, bool want_rpb) -> (Tensor, Tensor)")


def _unpack(qkv: torch.Tensor):
    """q, k, v as (B, heads, H, W, D) views of a packed (B, H, W, 3, heads, D) projection."""
    return qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)


def _forward_fake(q, kernel_size, keep_probabilities):
    batch, heads, height, width, dim = q.shape
    compute = _compute_dtype(q.dtype)
    out = q.new_empty(batch, height, width, heads, dim).permute(0, 3, 1, 2, 4)
    probs = q.new_empty((batch, heads, height, width, kernel_size[0] * kernel_size[1]) if keep_probabilities else (0,),
                        dtype=compute)
    return out, probs


def _rpb_grad_fake(probs, q_shape, kernel_size, want_rpb):
    return probs.new_empty((q_shape[1], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1) if want_rpb else (0,))


@torch.library.register_fake("dinat::na2d_cpp")
def _na2d_fake(q, k, v, rpb, kernel_size, dilation, scale, keep_probabilities):
    return _forward_fake(q, kernel_size, keep_probabilities)


@torch.library.register_fake("dinat::na2d_cpp_backward")
def _na2d_backward_fake(grad_out, q, k, v, probs, kernel_size, dilation, scale, want_rpb):
    batch, heads, height, width, dim = q.shape
    grad_qkv = probs.new_empty(batch, height, width, 3, heads, dim).permute(3, 0, 4, 1, 2, 5)
    return grad_qkv, _rpb_grad_fake(probs, q.shape, kernel_size, want_rpb)


@torch.library.register_fake("dinat::na2d_cpp_packed")
def _na2d_packed_fake(qkv, rpb, kernel_size, dilation, scale, keep_probabilities):
    return _forward_fake(_unpack(qkv)[0], kernel_size, keep_probabilities)


@torch.library.register_fake("dinat::na2d_cpp_packed_backward")
def _na2d_packed_backward_fake(grad_out, qkv, probs, kernel_size, dilation, scale, want_rpb):
    return probs.new_empty(qkv.shape), _rpb_grad_fake(probs, _unpack(qkv)[0].shape, kernel_size, want_rpb)


def _probabilities_get_no_gradient(ctx, probs: torch.Tensor) -> None:
    """The saved probabilities are an output only for backward's sake: no gradient flows into them, and backward
    is not handed a zero-filled one (as large as the attention weights)."""
    ctx.mark_non_differentiable(probs)
    ctx.set_materialize_grads(False)


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, dilation, scale, _ = inputs
    ctx.save_for_backward(q, k, v, output[1])
    _probabilities_get_no_gradient(ctx, output[1])
    ctx.arguments = (kernel_size, dilation, scale)
    ctx.dtypes = (q.dtype, k.dtype, v.dtype, None if rpb is None else rpb.dtype)


def _autograd_backward(ctx, grad_out, _grad_probs):
    q, k, v, probs = ctx.saved_tensors
    rpb_dtype = ctx.dtypes[3]
    want_rpb = rpb_dtype is not None and ctx.needs_input_grad[3]
    grad_qkv, grad_rpb = torch.ops.dinat.na2d_cpp_backward(grad_out, q, k, v, probs, *ctx.arguments, want_rpb)
    grads = [g.to(dtype) for g, dtype in zip(grad_qkv.unbind(0), ctx.dtypes)]
    return *grads, (grad_rpb.to(rpb_dtype) if want_rpb else None), None, None, None, None


torch.library.register_autograd("dinat::na2d_cpp", _autograd_backward, setup_context=_setup_context)


# one packed (B, H, W, 3, heads, D) projection: its gradient comes back in its own layout, without copies
def _packed_setup_context(ctx, inputs, output):
    qkv, rpb, kernel_size, dilation, scale, _ = inputs
    ctx.save_for_backward(qkv, output[1])
    _probabilities_get_no_gradient(ctx, output[1])
    ctx.arguments = (kernel_size, dilation, scale)
    ctx.dtypes = (qkv.dtype, None if rpb is None else rpb.dtype)


def _packed_autograd_backward(ctx, grad_out, _grad_probs):
    qkv, probs = ctx.saved_tensors
    qkv_dtype, rpb_dtype = ctx.dtypes
    want_rpb = rpb_dtype is not None and ctx.needs_input_grad[1]
    grad_qkv, grad_rpb = torch.ops.dinat.na2d_cpp_packed_backward(grad_out, qkv, probs, *ctx.arguments, want_rpb)
    return grad_qkv.to(qkv_dtype), (grad_rpb.to(rpb_dtype) if want_rpb else None), None, None, None, None


torch.library.register_autograd("dinat::na2d_cpp_packed", _packed_autograd_backward,
                                setup_context=_packed_setup_context)


def _window_flops(q_shape, kernel_size) -> int:
    """Multiply-adds of one pass over every query's window (q . k, or probabilities . v), counted as 2 FLOPs."""
    batch, heads, height, width, dim = q_shape
    return 2 * batch * heads * height * width * kernel_size[0] * kernel_size[1] * dim


# torch.utils.flop_counter sees only aten ops: a C++ kernel needs its count stated (the exact windows, no halos)
@register_flop_formula(torch.ops.dinat.na2d_cpp)
def _forward_flops(q_shape, k_shape, v_shape, rpb_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return 2 * _window_flops(q_shape, kernel_size)  # scores, weighted sum of values


@register_flop_formula(torch.ops.dinat.na2d_cpp_packed)
def _packed_forward_flops(qkv_shape, rpb_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    batch, height, width, _, heads, dim = qkv_shape
    return 2 * _window_flops((batch, heads, height, width, dim), kernel_size)


@register_flop_formula(torch.ops.dinat.na2d_cpp_packed_backward)
def _packed_backward_flops(grad_shape, qkv_shape, probs_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return 4 * _window_flops(grad_shape, kernel_size)


@register_flop_formula(torch.ops.dinat.na2d_cpp_backward)
def _backward_flops(grad_shape, q_shape, k_shape, v_shape, probs_shape, kernel_size, *args, out_shape=None,
                    **kwargs) -> int:
    return 4 * _window_flops(q_shape, kernel_size)  # probabilities' gradients, then those of q, k and v


def _require_kernel() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the C++ neighborhood-attention kernel cannot run: {reason}")


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Pair, dilation: Pair,
         rpb: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Fused neighborhood attention: softmax(q k^T * scale + rpb) v over each query's window, on CPU.

    Returns (B, heads, H, W, D) in q's dtype, as a view of a (B, H, W, heads, D) tensor, so that merging heads
    back into channels is free.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    _require_kernel()
    keep_probabilities = plan.needs_grad(q, k, v, rpb)
    with torch.autocast("cpu", enabled=False):
        out, _ = torch.ops.dinat.na2d_cpp(q, k, v, rpb, list(kernel_size), list(dilation), scale, keep_probabilities)
    return out


def na2d_packed(qkv: torch.Tensor, kernel_size: Pair, dilation: Pair, rpb: torch.Tensor | None = None,
                scale: float | None = None) -> torch.Tensor:
    """`na2d` on q, k, v packed in one (B, H, W, 3, heads, D) projection; its gradient comes back in that layout."""
    scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    _require_kernel()
    keep_probabilities = plan.needs_grad(qkv, rpb)
    with torch.autocast("cpu", enabled=False):
        out, _ = torch.ops.dinat.na2d_cpp_packed(qkv, rpb, list(kernel_size), list(dilation), scale,
                                                 keep_probabilities)
    return out


__all__ = ["can_run", "na2d", "na2d_packed", "unavailable_reason"]
