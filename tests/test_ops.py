"""The op layer against the slow reference tester: forward and backward on hand-picked edge shapes."""

import pytest
import torch

from dinat.ops import na2d, na2d_av, na2d_qk
from reference_na import reference_na2d

# (height, width, kernel, dilation, batch, heads, head_dim): why each is here
EDGE_SHAPES = [
    (7, 7, 7, 1, 1, 1, 4),      # K equal to the axis: every query sees the whole map
    (9, 13, 3, 1, 2, 2, 8),     # non-square
    (14, 10, 5, 2, 2, 3, 4),    # K*d equal to the width
    (13, 14, 3, 4, 1, 2, 4),    # unequal dilation groups on both axes (13 % 4, 14 % 4)
    (12, 12, 5, 2, 2, 2, 4),    # equal groups
    (16, 17, 3, 5, 1, 2, 4),    # dilation larger than half the axis, uneven groups
    (16, 16, 1, 16, 1, 1, 4),   # dilation 16, K=1 (each query attends to itself only)
    (48, 50, 3, 16, 1, 1, 2),   # dilation 16, K=3, uneven groups
    (13, 13, 13, 1, 1, 2, 4),   # K = 13
    (11, 12, 9, 1, 1, 1, 4),    # K = 9 with tiles that overlap the halo
    (20, 9, 7, 1, 2, 2, 4),     # K = 7, more rows than the tile
    (30, 15, 3, 3, 1, 3, 2),    # many tiles per group
]


def _inputs(shape, dtype=torch.float64, seed=0):
    height, width, kernel, dilation, batch, heads, dim = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, height, width, dim, generator=g, dtype=dtype) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g, dtype=dtype)
    return q, k, v, rpb


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("use_rpb", [True, False], ids=["rpb", "no_rpb"])
def test_fused_matches_reference_forward_backward(shape, use_rpb):
    kernel, dilation = shape[2], shape[3]
    q, k, v, rpb = _inputs(shape)
    rpb = rpb if use_rpb else None
    leaves = [t.requires_grad_() for t in (q, k, v) + ((rpb,) if use_rpb else ())]
    expected, _ = reference_na2d(q, k, v, kernel, dilation, rpb)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    out = na2d(q, k, v, kernel, dilation, rpb=rpb)
    grads = torch.autograd.grad(out, leaves, grad_out)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_traced_path_matches_reference(shape):
    # the plain differentiable version that torch.export runs instead of the eager kernel's custom op
    from dinat.ops.traced import na2d as traced_na2d

    kernel, dilation = shape[2], shape[3]
    q, k, v, rpb = _inputs(shape, seed=2)
    leaves = [t.requires_grad_() for t in (q, k, v, rpb)]
    expected, _ = reference_na2d(q, k, v, kernel, dilation, rpb)
    out = traced_na2d(q, k, v, (kernel, kernel), (dilation, dilation), rpb=rpb)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out),
                         torch.autograd.grad(expected, leaves, grad_out)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", EDGE_SHAPES[:6], ids=lambda s: "x".join(map(str, s)))
def test_unfused_pair_matches_reference(shape):
    kernel, dilation = shape[2], shape[3]
    q, k, v, rpb = _inputs(shape, seed=1)
    leaves = [t.requires_grad_() for t in (q, k, v, rpb)]
    expected_out, expected_weights = reference_na2d(q, k, v, kernel, dilation, rpb, scale=0.3)
    weights = na2d_qk(q * 0.3, k, kernel, dilation, rpb=rpb).softmax(-1)
    out = na2d_av(weights, v, kernel, dilation)
    torch.testing.assert_close(weights, expected_weights, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, expected_out, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out),
                         torch.autograd.grad(expected_out, leaves, grad_out)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_weights_are_in_row_major_window_order():
    # K=3, no dilation, query at the top-left corner: its window is rows 0..2, cols 0..2 in row-major order
    q = torch.zeros(1, 1, 5, 5, 1)
    k = torch.zeros(1, 1, 5, 5, 1)
    q[..., 0, 0, 0] = 1.0
    k[0, 0, :, :, 0] = torch.arange(25.0).view(5, 5)
    scores = na2d_qk(q, k, 3, 1)[0, 0, 0, 0]
    assert scores.tolist() == [0.0, 1.0, 2.0, 5.0, 6.0, 7.0, 10.0, 11.0, 12.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_dtypes(dtype):
    shape = (12, 12, 5, 2, 2, 2, 8)
    q, k, v, rpb = _inputs(shape, dtype=torch.float64, seed=3)
    expected, _ = reference_na2d(q, k, v, 5, 2, rpb)
    out = na2d(q.to(dtype), k.to(dtype), v.to(dtype), 5, 2, rpb=rpb.to(dtype))
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def _peak_op_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(evt.cpu_memory_usage for evt in prof.key_averages())


def test_fused_memory_is_linear_and_below_kk_copies():
    # K=7, head_dim 32 (DiNAT's): K*K gathered copies of K alone would be 49 maps; an (H*W)^2 score
    # matrix of a 128x256 map would be 4 GiB. The largest allocation must stay below 0.6 * 49 maps and
    # double (not quadruple) when the map doubles.
    peaks = []
    for height in (64, 128):
        q, k, v = (torch.randn(1, 1, height, 256, 32) for _ in range(3))
        rpb = torch.randn(1, 13, 13)
        peak = _peak_op_allocation(lambda: na2d(q, k, v, 7, 1, rpb=rpb))
        map_bytes = q.numel() * q.element_size()
        assert peak < 0.6 * 49 * map_bytes, f"{peak / 2**20:.0f} MiB for a {map_bytes / 2**20:.0f} MiB map"
        peaks.append(peak)
    assert peaks[1] / peaks[0] < 2.3


@pytest.mark.parametrize("call, message", [
    (lambda q: na2d(q, q, q, 4, 1), "kernel_size must be odd"),
    (lambda q: na2d(q, q, q, 3, 0), "dilation must be >= 1"),
    (lambda q: na2d(q, q, q, 5, 2), "height >= kernel_size \\* dilation"),
    (lambda q: na2d(q[0], q[0], q[0], 3, 1), "expected \\(batch, heads, height, width, head_dim\\)"),
    (lambda q: na2d(q.long(), q.long(), q.long(), 3, 1), "floating-point"),
    (lambda q: na2d(q, q, q, 3, 1, rpb=torch.zeros(2, 3, 3)), "rpb must have shape \\(2, 5, 5\\)"),
    (lambda q: na2d(q, q[:, :, :4], q, 3, 1), "key shape"),
])
def test_bad_input_errors(call, message):
    q = torch.randn(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match=message):
        call(q)


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep-probabilities"])
def test_custom_op_passes_opcheck(keep):
    # torch.compile calls the eager kernel through the custom op `dinat::na2d`: its fake (shape-only) version,
    # its registered autograd and its schema must agree with the kernel (strides included)
    import dinat.ops.torch_backend  # noqa: F401  (registers the ops)

    q, k, v, rpb = _inputs((9, 10, 3, 2, 2, 2, 4), seed=3)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), rpb.requires_grad_(), [3, 3], [2, 2],
            0.5, [0, 0], keep)
    torch.library.opcheck(torch.ops.dinat.na2d.default, args)
