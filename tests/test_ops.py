"""The op layer against the slow reference (na_tester): forward and backward on hand-picked edge shapes; its
window order, memory, errors and custom-op registration."""

import pytest
import torch

from dinat.ops import na2d, na2d_av, na2d_qk, traced
from na_tester import NACase, assert_close, reference_run

# why each is here
EDGE_CASES = [
    NACase(7, 7, 7, 1, 1, 1, 4),      # K equal to the axis: every query sees the whole map
    NACase(9, 13, 3, 1, 2, 2, 8),     # non-square
    NACase(14, 10, 5, 2, 2, 3, 4),    # K*d equal to the width
    NACase(13, 14, 3, 4, 1, 2, 4),    # unequal dilation groups on both axes (13 % 4, 14 % 4)
    NACase(12, 12, 5, 2, 2, 2, 4),    # equal groups
    NACase(16, 17, 3, 5, 1, 2, 4),    # dilation larger than half the axis, uneven groups
    NACase(16, 16, 1, 16, 1, 1, 4),   # dilation 16, K=1 (each query attends to itself only)
    NACase(48, 50, 3, 16, 1, 1, 2),   # dilation 16, K=3, uneven groups
    NACase(13, 13, 13, 1, 1, 2, 4),   # K = 13
    NACase(11, 12, 9, 1, 1, 1, 4),    # K = 9 with tiles that overlap the halo
    NACase(20, 9, 7, 1, 2, 2, 4),     # K = 7, more rows than the tile
    NACase(30, 15, 3, 3, 1, 3, 2),    # many tiles per group
]


@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
@pytest.mark.parametrize("use_rpb", [True, False], ids=["rpb", "no_rpb"])
def test_op_matches_reference_forward_backward(case, use_rpb):
    # the public op with the automatic choice (on CPU: the eager tiled kernel), float64
    reference_run(case, use_rpb).check(lambda q, k, v, rpb: na2d(q, k, v, case.kernel, case.dilation, rpb=rpb))


@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
def test_traced_path_matches_reference(case):
    # the plain differentiable version that torch.export runs instead of the eager kernel's custom op
    pair = (case.kernel, case.kernel), (case.dilation, case.dilation)
    reference_run(case).check(lambda q, k, v, rpb: traced.na2d(q, k, v, *pair, rpb=rpb), what="traced na2d")


@pytest.mark.parametrize("case", EDGE_CASES[:6], ids=str)
def test_unfused_pair_matches_reference(case):
    # na2d_qk then na2d_av (the path that returns attention weights), with a scale other than the default
    run = reference_run(case, scale=0.3)
    weights = []

    def unfused(q, k, v, rpb):
        weights.append(na2d_qk(q * 0.3, k, case.kernel, case.dilation, rpb=rpb).softmax(-1))
        return na2d_av(weights[-1], v, case.kernel, case.dilation)

    run.check(unfused, what="na2d_qk + na2d_av")
    assert_close(weights[0], run.weights, 1e-10, "attention weights")


def test_weights_are_in_row_major_window_order():
    # K=3, no dilation, query at the top-left corner: its window is rows 0..2, cols 0..2 in row-major order
    q = torch.zeros(1, 1, 5, 5, 1)
    k = torch.zeros(1, 1, 5, 5, 1)
    q[..., 0, 0, 0] = 1.0
    k[0, 0, :, :, 0] = torch.arange(25.0).view(5, 5)
    scores = na2d_qk(q, k, 3, 1)[0, 0, 0, 0]
    assert scores.tolist() == [0.0, 1.0, 2.0, 5.0, 6.0, 7.0, 10.0, 11.0, 12.0]


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

    run = reference_run(NACase(9, 10, 3, 2, 2, 2, 4))
    q, k, v, rpb = (t.clone().requires_grad_() for t in run.leaves())
    args = (q, k, v, rpb, [3, 3], [2, 2], 0.5, [0, 0], keep)
    torch.library.opcheck(torch.ops.dinat.na2d.default, args)
