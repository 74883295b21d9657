"""The C++ CPU kernel (`dinat.ops.cpp_backend`): it builds on this machine, agrees with the reference tester on
each of its code paths (float32 on AVX-512: dense products per dilation group where a group is one window,
16 queries per vector for kernel widths 3..13, one query per vector for other windows up to 256 keys and the
backward; plain loops for everything else), reads strided views, the packed qkv projection and (on its two
fastest paths) bfloat16 in place, multiplying it as bfloat16 pairs on CPUs with AVX512-BF16, and is what the
dispatcher picks on CPU, unless it cannot be built, in which case the torch backend runs and forcing cpp says why."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dinat import ops
from dinat.ops import cpp_backend, dispatch
from na_tester import NACase, reference_run
from reference_na import reference_na2d, reference_windows


def test_the_kernel_builds_here():
    # every other test here skips with this reason where the kernel is absent: on this machine it must not be
    if os.environ.get(cpp_backend.BUILD_SWITCH) == "0":
        pytest.skip(f"{cpp_backend.BUILD_SWITCH}=0")
    assert cpp_backend.unavailable_reason() is None


# vector paths: float32, head_dim in (16, 32, 48, 64), kernel_h * kernel_w <= 256; the rest runs the plain loops
VECTOR_CASES = [
    NACase(14, 14, 7, 1, 2, 2, 32),    # DiNAT's head_dim and kernel
    NACase(22, 23, 7, 3, 1, 2, 32),    # uneven dilation groups on both axes
    NACase(16, 16, 7, 2, 1, 1, 64),
    NACase(13, 12, 3, 4, 2, 1, 16),    # a 9-key window: one partial group of 16 scores
    NACase(12, 12, 11, 1, 1, 1, 48),   # DiNAT-L 11x11: 121 keys
    NACase(15, 17, 15, 1, 1, 1, 16),   # 225 keys: one query per vector (kernel width above 13)
    NACase(9, 10, 1, 1, 1, 2, 16),     # a single key
]
# each dilation group exactly one window (length == kernel * dilation): dense products per group
GROUP_CASES = [
    NACase(14, 14, 7, 2, 2, 2, 32),    # DiNAT's dilated layers at 224x224: 49 keys, four vectors per score row
    NACase(7, 7, 7, 1, 3, 3, 64),      # its last stage: the map is one window
    NACase(15, 15, 5, 3, 1, 2, 48),    # 25 keys: two vectors
    NACase(9, 9, 3, 3, 2, 1, 16),      # 9 keys: one vector
]
LOOP_CASES = [
    NACase(12, 13, 5, 2, 2, 2, 8),     # head_dim not a multiple of 16
    NACase(11, 11, 3, 3, 1, 3, 80),    # head_dim above 64
    NACase(17, 17, 17, 1, 1, 1, 16),   # 289 keys
]


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if cpp_backend.unavailable_reason() is not None:
        pytest.skip(cpp_backend.unavailable_reason())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("use_rpb", [True, False], ids=["rpb", "no_rpb"])
@pytest.mark.parametrize("case", VECTOR_CASES + GROUP_CASES + LOOP_CASES, ids=str)
def test_kernel_matches_reference_forward_and_backward(case, use_rpb, dtype):
    reference_run(case, use_rpb, seed=3).check_backend("cpp", dtype, backward=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_match_the_reference_and_come_back_in_their_dtype(dtype):
    reference_run(VECTOR_CASES[1], seed=3).check_backend("cpp", dtype, backward=True)


def _copies(call) -> tuple[int, object]:
    """(how many aten::copy_ a call runs, its result): a float32 copy of bfloat16 inputs shows as copies."""
    with torch.profiler.profile() as profile:
        result = call()
    return sum(event.name == "aten::copy_" for event in profile.events()), result


@pytest.mark.parametrize("case, reads_in_place", [(VECTOR_CASES[3], True), (VECTOR_CASES[4], True),
                                                   (GROUP_CASES[2], True), (GROUP_CASES[3], True),
                                                   (VECTOR_CASES[5], False), (LOOP_CASES[0], False)], ids=str)
def test_bfloat16_is_read_in_place_where_the_fast_paths_run(case, reads_in_place):
    # the group and 16-queries paths convert bfloat16 as they gather; the others get a float32 copy first. Either
    # way the result is the float32 kernel's on the widened (exact) inputs, bit for bit, the output rounded to
    # bfloat16 (head_dims 48 and 16 keep both paths in float32 on every CPU: no bfloat16 pair products)
    generator = torch.Generator().manual_seed(2)
    shape = (case.batch, case.heads, case.height, case.width, case.head_dim)
    q, k, v = (torch.randn(shape, generator=generator).bfloat16() for _ in range(3))
    rpb = torch.randn(case.heads, 2 * case.kernel - 1, 2 * case.kernel - 1, generator=generator)
    arguments = (rpb, [case.kernel] * 2, [case.dilation] * 2, 0.3, True)
    copies, (out, probs) = _copies(lambda: torch.ops.dinat.na2d_cpp(q, k, v, *arguments))
    assert (copies == 0) == reads_in_place
    want_out, want_probs = torch.ops.dinat.na2d_cpp(q.float(), k.float(), v.float(), *arguments)
    assert out.dtype == torch.bfloat16 and probs.dtype == torch.float32
    assert torch.equal(out, want_out.bfloat16()) and torch.equal(probs, want_probs)


# bfloat16 pair products, for head_dims of whole 32-value chunks: the group path with windows of one to four
# vectors, the 16-queries path with odd kernel widths from 3 to 11, dilated, with partial tiles
PAIR_CASES = [GROUP_CASES[0], GROUP_CASES[1], NACase(15, 15, 5, 3, 1, 2, 32), NACase(9, 9, 3, 3, 2, 1, 32),
              VECTOR_CASES[0], VECTOR_CASES[1], VECTOR_CASES[2], NACase(13, 17, 3, 3, 1, 2, 32),
              NACase(12, 13, 11, 1, 1, 1, 64)]


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="this CPU has no AVX512-BF16 instructions")
@pytest.mark.parametrize("case", PAIR_CASES, ids=str)
def test_bfloat16_multiplies_bfloat16_pairs_in_the_fast_paths(case):
    # the scores are the exact products of the bfloat16 q and k summed in float32, so the probabilities are the
    # float64 softmax's to float32 precision; the values are weighted with those probabilities rounded to bfloat16,
    # and the output is that sum rounded to bfloat16. The float32 path (widened inputs) gives another output.
    run = reference_run(case, seed=4)
    q, k, v = (t.bfloat16() for t in (run.q, run.k, run.v))
    kernel, dilation = [case.kernel] * 2, [case.dilation] * 2
    arguments = (run.rpb.float(), kernel, dilation, case.head_dim ** -0.5, True)
    copies, (out, probs) = _copies(lambda: torch.ops.dinat.na2d_cpp(q, k, v, *arguments))
    assert copies == 0 and out.dtype == torch.bfloat16
    _, exact_probs = reference_na2d(q.double(), k.double(), v.double(), case.kernel, case.dilation,
                                    run.rpb.float().double())
    torch.testing.assert_close(probs.double(), exact_probs, atol=1e-6, rtol=0)
    rows, cols, _, _ = (torch.tensor(t) for t in reference_windows(case.height, case.width, case.kernel,
                                                                     case.dilation))
    values = v.double()[:, :, rows, cols].view(*probs.shape, case.head_dim)
    weighted = (probs.bfloat16().double()[..., None] * values).sum(-2)
    torch.testing.assert_close(out.double(), weighted, atol=1e-5, rtol=2 ** -8)
    float32_out, _ = torch.ops.dinat.na2d_cpp(q.float(), k.float(), v.float(), *arguments)
    assert not torch.equal(out, float32_out.bfloat16())


def test_scale_argument_is_applied():
    reference_run(VECTOR_CASES[0], scale=0.3).check_backend("cpp", torch.float32, backward=True)


def _packed(batch, heads, height, width, dim, generator):
    """q, k, v as the model makes them: views of one (B, H, W, 3, heads, D) projection."""
    qkv = torch.randn(batch, height, width, 3, heads, dim, generator=generator)
    return [t.requires_grad_() for t in qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)]


@pytest.mark.parametrize("dim", [32, 8], ids=["vector", "loops"])
def test_strided_views_are_read_in_place_and_output_is_channels_last(dim):
    generator = torch.Generator().manual_seed(0)
    q, k, v = _packed(2, 3, 15, 16, dim, generator)
    rpb = torch.randn(3, 9, 9, generator=generator, requires_grad=True)
    out = ops.na2d(q, k, v, 5, 2, rpb=rpb, backend="cpp")
    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    expected = ops.na2d(*dense, 5, 2, rpb=rpb, backend="torch")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # (B, heads, H, W, D) viewing (B, H, W, heads, D): merging heads into channels is a free reshape
    assert out.permute(0, 2, 3, 1, 4).is_contiguous()
    grad = torch.randn(out.shape, generator=generator)
    for got, want in zip(torch.autograd.grad(out, (q, k, v, rpb), grad),
                         torch.autograd.grad(expected, (*dense, rpb), grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_custom_op_passes_opcheck():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 10, 16, generator=generator) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=generator)
    torch.library.opcheck(torch.ops.dinat.na2d_cpp.default, (q, k, v, rpb, [3, 3], [2, 3], 0.25, True))
    torch.library.opcheck(torch.ops.dinat.na2d_cpp.default, (q, k, v, None, [3, 3], [1, 1], 0.25, False))


def test_automatic_choice_on_cpu_is_cpp_and_logged(caplog):
    q = torch.zeros(1, 2, 14, 14, 32)
    with caplog.at_level(logging.DEBUG, logger="dinat.ops"):
        ops.na2d(q, q, q, 7, 1)
    assert any("backend cpp" in record.getMessage() for record in caplog.records)


def test_without_the_kernel_the_torch_backend_runs_and_forcing_cpp_says_why():
    script = textwrap.dedent("""
        import torch
        from dinat import ops
        from dinat.ops import dispatch
        q = torch.randn(1, 2, 14, 14, 32)
        assert dispatch.choose(None, q, True, False, (7, 7), (1, 1)) == "torch"
        compiled = torch.compile(lambda q: ops.na2d(q, q, q, 7, 1), backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(q), ops.na2d(q, q, q, 7, 1, backend="torch"))
        try:
            ops.na2d(q, q, q, 7, 1, backend="cpp")
        except ValueError as err:
            assert "DINAT_BUILD_KERNELS=0" in str(err), err
        else:
            raise AssertionError("forcing cpp without the kernel must fail")
        # the linears' fused op is the extension's too: without it they are the plain ops
        x, weight, bias = torch.randn(5, 32), torch.randn(16, 32), torch.randn(16)
        with torch.no_grad():
            fused = ops.linear(x, weight, bias, gelu=True)
        torch.testing.assert_close(fused, torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias)))
        print("ok")
    """)
    env = dict(os.environ, **{cpp_backend.BUILD_SWITCH: "0"})
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_cuda_tensors_are_refused_with_the_reason():
    assert "CPU only" in dispatch.why_not("cpp", torch.zeros(1, 1, 7, 7, 16, device="meta"), True, False)


def test_a_failed_build_falls_back_to_torch_with_the_reason(tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    script = textwrap.dedent(f"""
        import torch
        from dinat.ops import cpp_backend, dispatch
        cpp_backend.SOURCES = (__import__("pathlib").Path({str(broken)!r}),)
        reason = cpp_backend.unavailable_reason()
        assert reason is not None and "could not be built" in reason, reason
        q = torch.randn(1, 2, 14, 14, 32)
        assert dispatch.choose(None, q, True, False, (7, 7), (1, 1)) == "torch"
        print("ok")
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_entry_point_matches_separate_views_and_keeps_the_gradient_layout(dtype):
    # DiNAT's layers pass their qkv projection packed: the gradient comes back as one contiguous tensor
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 14, 15, 3, 2, 32, generator=generator).to(dtype).requires_grad_()
    rpb = torch.randn(2, 13, 13, generator=generator, requires_grad=True)
    out = ops.na2d_packed(qkv, 7, 2, rpb=rpb, scale=0.2, backend="cpp")
    separate = qkv.detach().clone().requires_grad_()
    expected = ops.na2d(*separate.permute(3, 0, 4, 1, 2, 5).unbind(0), 7, 2, rpb=rpb, scale=0.2, backend="torch")
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, expected, **tolerance)
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    got_qkv, got_rpb = torch.autograd.grad(out, (qkv, rpb), grad)
    want_qkv, want_rpb = torch.autograd.grad(expected, (separate, rpb), grad)
    assert got_qkv.dtype == dtype and got_qkv.is_contiguous()
    torch.testing.assert_close(got_qkv, want_qkv, **tolerance)
    torch.testing.assert_close(got_rpb, want_rpb, atol=1e-3 if dtype == torch.float32 else 0.5, rtol=1e-3)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_backward_is_not_handed_a_zero_gradient_for_the_probabilities(packed):
    # the probabilities are an op output only so that backward can read them: zero-filling a gradient for them
    # (as large as the attention weights) on every backward call would be wasted time
    qkv = torch.randn(2, 14, 15, 3, 2, 32, requires_grad=True)
    rpb = torch.randn(2, 13, 13, requires_grad=True)
    with torch.autocast("cpu", enabled=False):
        if packed:
            out, probs = torch.ops.dinat.na2d_cpp_packed(qkv, rpb, [7, 7], [1, 1], 0.2, True)
        else:
            out, probs = torch.ops.dinat.na2d_cpp(*cpp_backend._unpack(qkv), rpb, [7, 7], [1, 1], 0.2, True)
    assert out.requires_grad and not probs.requires_grad
    with torch.profiler.profile(record_shapes=True) as profile:
        out.sum().backward()
    filled = [event.input_shapes[0] for event in profile.events() if event.name in ("aten::fill_", "aten::zero_")]
    assert list(probs.shape) not in filled
    assert qkv.grad is not None and rpb.grad is not None


def test_packed_custom_op_passes_opcheck():
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 9, 10, 3, 2, 16, generator=generator)
    rpb = torch.randn(2, 5, 5, generator=generator)
    torch.library.opcheck(torch.ops.dinat.na2d_cpp_packed.default, (qkv, rpb, [3, 3], [2, 3], 0.25, True))


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    # torch's extension builder waits forever on a lock file whose process was killed mid-build
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "lock").touch()
    old = time.time() - 2 * cpp_backend.STALE_LOCK_SECONDS
    os.utime(stale / "lock", (old, old))
    assert cpp_backend.remove_stale_lock(stale) and not (stale / "lock").exists()
    assert not cpp_backend.remove_stale_lock(fresh) and (fresh / "lock").exists()
    assert not cpp_backend.remove_stale_lock(tmp_path / "missing")
