"""The shared tester of every neighborhood-attention implementation (op layer, backends, traced path, tilings).

A `NACase` is one problem (map size, kernel, dilation, batch, heads, head_dim). `ReferenceRun` draws its inputs
once in float64 and runs the slow reference (reference_na.py) forward and backward; `check` then runs an
implementation on the same inputs cast to a dtype and device, and compares its output and its gradients of q, k, v
and the RPB with the reference's, within the tolerance stated for that dtype. `check_backend` does the same for a
named backend of `dinat.ops`, and skips with the backend's own `can_run` reason where it cannot run the call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from dinat import ops
from dinat.ops import dispatch
from reference_na import reference_na2d

# Largest error allowed, relative to the largest magnitude of the expected tensor (at least 1): float64 runs
# the same arithmetic in another order; float32 as float32 matmuls do; half types keep ~3 significant digits.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass(frozen=True)
class NACase:
    height: int
    width: int
    kernel: int
    dilation: int
    batch: int = 1
    heads: int = 2
    head_dim: int = 4

    def __str__(self) -> str:  # the pytest id
        return (f"{self.height}x{self.width}-k{self.kernel}-d{self.dilation}-b{self.batch}-h{self.heads}"
                f"-dim{self.head_dim}")


def assert_close(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bound = tolerance * max(1.0, want.abs().max().item())
    error = (got.detach().cpu().double() - want).abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


class ReferenceRun:
    """The reference's output, attention weights and gradients for one case, from seeded float64 inputs."""

    def __init__(self, case: NACase, use_rpb: bool = True, seed: int = 0, scale: float | None = None):
        self.case, self.use_rpb, self.scale = case, use_rpb, scale
        generator = torch.Generator().manual_seed(seed)
        shape = (case.batch, case.heads, case.height, case.width, case.head_dim)
        self.q, self.k, self.v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
        span = 2 * case.kernel - 1
        self.rpb = torch.randn(case.heads, span, span, generator=generator, dtype=torch.float64) if use_rpb else None
        self.grad_out = torch.randn(shape, generator=generator, dtype=torch.float64)

        leaves = [t.clone().requires_grad_() for t in self.leaves()]
        out, weights = reference_na2d(*leaves[:3], case.kernel, case.dilation, leaves[3] if use_rpb else None,
                                      scale=scale)
        self.out, self.weights = out.detach(), weights.detach()
        self.grads = [g.detach() for g in torch.autograd.grad(out, leaves, self.grad_out)]

    def leaves(self) -> list[torch.Tensor]:
        """q, k, v and (if used) the RPB: what gradients are checked for."""
        return [self.q, self.k, self.v] + ([self.rpb] if self.use_rpb else [])

    def check(self, na2d, dtype: torch.dtype = torch.float64, device: str = "cpu", backward: bool = True,
              tolerance: float | None = None, what: str = "na2d") -> None:
        """Run `na2d(q, k, v, rpb)` (rpb None without RPB) on the inputs in `dtype` on `device`; compare the output
        and, with `backward`, the gradients of every input with the reference's."""
        tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
        inputs = [t.to(device=device, dtype=dtype).requires_grad_(backward) for t in self.leaves()]
        with torch.set_grad_enabled(backward):
            out = na2d(*inputs[:3], inputs[3] if self.use_rpb else None)
        assert out.dtype == dtype and out.device.type == torch.device(device).type, (out.dtype, out.device)
        assert_close(out, self.out, tolerance, f"{what} output")
        if not backward:
            return
        grads = torch.autograd.grad(out, inputs, self.grad_out.to(device=device, dtype=dtype))
        for name, got, want in zip(("q", "k", "v", "rpb"), grads, self.grads):
            assert got.dtype == dtype, f"{what}: gradient of {name} is {got.dtype}"
            assert_close(got, want, tolerance, f"{what} gradient of {name}")

    def check_backend(self, backend: str, dtype: torch.dtype = torch.float64, device: str = "cpu",
                      backward: bool = True, tolerance: float | None = None) -> None:
        """`check` of `dinat.ops.na2d(..., backend=backend)`; skipped with the backend's reason where it cannot run."""
        probe = self.q.to(device=device, dtype=dtype)
        reason = dispatch.why_not(backend, probe, self.use_rpb, backward)
        if reason is not None:
            pytest.skip(f"backend {backend!r} cannot run here: {reason}")
        case = self.case

        def na2d(q, k, v, rpb):
            return ops.na2d(q, k, v, case.kernel, case.dilation, rpb=rpb, scale=self.scale, backend=backend)

        self.check(na2d, dtype, device, backward, tolerance, what=f"backend {backend}")


@functools.lru_cache(maxsize=64)
def reference_run(case: NACase, use_rpb: bool = True, seed: int = 0, scale: float | None = None) -> ReferenceRun:
    """`ReferenceRun`, computed once per test session for each case (the reference is slow; runs do not mutate it)."""
    return ReferenceRun(case, use_rpb, seed, scale)
