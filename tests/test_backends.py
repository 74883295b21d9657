"""Every neighborhood-attention backend against the slow reference tester, and the dispatch between them.

Backends that cannot run here (NATTEN not installed, no GPU, no flex backward on CPU) are skipped with
the reason the dispatcher itself gives.
"""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from dinat import DinatConfig, DinatForImageClassification, ops
from dinat.ops import dispatch, plan, tiled, torch_backend, traced
from reference_na import reference_na2d

GPU_REASON = "no CUDA device here; GPU backends are tested on a GPU machine"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_REASON))]

# (height, width, kernel, dilation, batch, heads, head_dim)
SHAPES = [
    (14, 14, 7, 1, 2, 2, 16),   # DiNAT's K=7: two tiles of 7 per axis
    (13, 17, 3, 2, 1, 2, 16),   # uneven dilation groups on both axes
    (16, 16, 7, 2, 1, 1, 16),   # groups of 8 x 8 with K=7
    (21, 19, 5, 1, 1, 2, 16),   # partial last tiles
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _inputs(shape, dtype, device, seed=0, use_rpb=True):
    height, width, kernel, dilation, batch, heads, dim = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, height, width, dim, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g, dtype=torch.float64) if use_rpb else None
    return q, k, v, rpb


def _runnable(backend, q, has_rpb, needs_grad):
    reason = dispatch.why_not(backend, q, has_rpb, needs_grad)
    if reason is not None:
        pytest.skip(f"{backend} cannot run here: {reason}")


def _close(got, want, dtype, what):
    """Tolerance relative to the largest magnitude of the expected tensor (at least 1)."""
    tol = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("use_rpb", [True, False], ids=["rpb", "no_rpb"])
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_forward_matches_reference(shape, backend, use_rpb, dtype, device):
    q, k, v, rpb = _inputs(shape, dtype, device, use_rpb=use_rpb)
    expected, _ = reference_na2d(q, k, v, shape[2], shape[3], rpb)
    cast = [None if t is None else t.to(device=device, dtype=dtype) for t in (q, k, v, rpb)]
    _runnable(backend, cast[0], use_rpb, needs_grad=False)
    with torch.no_grad():
        out = ops.na2d(*cast[:3], shape[2], shape[3], rpb=cast[3], backend=backend)
    assert out.dtype == dtype and out.shape == expected.shape
    _close(out.cpu(), expected, dtype, f"{backend} output")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_rpb", [True, False], ids=["rpb", "no_rpb"])
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_backend_backward_matches_reference(shape, backend, use_rpb, dtype, device):
    q, k, v, rpb = _inputs(shape, dtype, device, seed=1, use_rpb=use_rpb)
    leaves = [t.requires_grad_() for t in (q, k, v, rpb) if t is not None]
    expected, _ = reference_na2d(q, k, v, shape[2], shape[3], rpb)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    cast = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in leaves]
    _runnable(backend, cast[0], use_rpb, needs_grad=True)
    out = ops.na2d(*cast[:3], shape[2], shape[3], rpb=cast[3] if use_rpb else None, backend=backend)
    grads = torch.autograd.grad(out, cast, grad_out.to(device=device, dtype=dtype))
    for name, got, want in zip("q k v rpb".split(), grads, expected_grads):
        assert got.dtype == dtype
        _close(got.cpu(), want, dtype, f"{backend} grad of {name}")


@pytest.mark.parametrize("path", [torch_backend.na2d, traced.na2d], ids=["eager-kernel", "traced"])
@pytest.mark.parametrize("tile", [3, 4, 5, 6, 8, 11, 40])
@pytest.mark.parametrize("size", [(11, 23), (17, 12)])
def test_torch_backend_every_tiling_matches_reference(size, tile, path):
    # tiles that leave partial last tiles and halos clamped at both ends, forward and backward; the eager
    # kernel and the traced (export) path read the same plan
    shape = (*size, 5, 1, 1, 2, 4)
    q, k, v, rpb = _inputs(shape, torch.float64, "cpu", seed=2)
    leaves = [t.requires_grad_() for t in (q, k, v, rpb)]
    expected, _ = reference_na2d(q, k, v, 5, 1, rpb)
    fits = [plan.tile_fits(length, 5, tile) for length in size]
    if not all(fits):
        with pytest.raises(ValueError, match="does not fit"):
            path(q, k, v, (5, 5), (1, 1), rpb=rpb, tile=tile)
        return
    out = path(q, k, v, (5, 5), (1, 1), rpb=rpb, tile=tile)
    grad_out = torch.randn_like(out)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(expected, leaves, grad_out)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 10**9], ids=["tile-rows", "batch-items", "whole"])
def test_torch_backend_chunking_matches_reference(monkeypatch, chunk_bytes):
    # the scores are computed in chunks (batch items, or rows of tiles when one item is too big)
    monkeypatch.setattr(tiled, "CHUNK_BYTES", chunk_bytes)
    shape = (20, 18, 5, 2, 3, 2, 4)
    q, k, v, rpb = _inputs(shape, torch.float64, "cpu", seed=4)
    leaves = [t.requires_grad_() for t in (q, k, v, rpb)]
    expected, _ = reference_na2d(q, k, v, 5, 2, rpb)
    out = torch_backend.na2d(q, k, v, (5, 5), (2, 2), rpb=rpb, tile=5)
    grad_out = torch.randn_like(out)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(expected, leaves, grad_out)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_automatic_choice_on_cpu_is_torch_and_logged(caplog):
    q, k, v, rpb = (t.float() for t in _inputs(SHAPES[0], torch.float32, "cpu"))
    with caplog.at_level(logging.DEBUG, logger="dinat.ops"):
        ops.na2d(q, k, v, 7, 1, rpb=rpb)
    assert any("backend torch" in record.getMessage() and "cpu" in record.getMessage() for record in caplog.records)


def test_forcing_a_backend_that_cannot_run_says_why():
    q, k, v, rpb = (t.float() for t in _inputs(SHAPES[0], torch.float32, "cpu"))
    # flex attention has no backward on CPU in the pinned torch
    with pytest.raises(ValueError, match="backend 'flex' cannot run this call: .*no flex-attention backward"):
        ops.na2d(q.requires_grad_(), k, v, 7, 1, rpb=rpb, backend="flex")
    # NATTEN is either absent or (>= 0.20) without RPB: both are explained
    with pytest.raises(ValueError, match="backend 'natten' cannot run this call: .*(not installed|no relative)"):
        ops.na2d(q.detach(), k, v, 7, 1, rpb=rpb, backend="natten")
    with pytest.raises(ValueError, match="unknown neighborhood-attention backend 'cuda'"):
        ops.na2d(q.detach(), k, v, 7, 1, backend="cuda")


def test_context_manager_overrides_the_argument_and_restores():
    q, k, v, rpb = (t.float() for t in _inputs(SHAPES[0], torch.float32, "cpu"))
    with ops.use_backend("flex"):
        assert dispatch.forced_backend() == "flex"
        with pytest.raises(ValueError, match="backend 'flex' cannot run"):
            ops.na2d(q.requires_grad_(), k, v, 7, 1, rpb=rpb, backend="torch")
        with ops.use_backend("auto"):
            assert dispatch.forced_backend() is None
    assert dispatch.forced_backend() is None
    with pytest.raises(ValueError, match="unknown neighborhood-attention backend"):
        with ops.use_backend("fast"):
            pass


def test_config_fields_validate_and_serialize(tmp_path):
    config = DinatConfig.from_preset("mini", use_rpb=False, na_backend="torch")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["use_rpb"] is False and saved["na_backend"] == "torch"
    loaded = DinatConfig.from_pretrained(tmp_path)
    assert loaded.use_rpb is False and loaded.na_backend == "torch"
    # a hub config (transformers' DiNAT) has neither field: the defaults apply
    del saved["use_rpb"], saved["na_backend"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    hub_like = DinatConfig.from_pretrained(tmp_path)
    assert hub_like.use_rpb is True and hub_like.na_backend == "auto"
    with pytest.raises(ValueError, match="na_backend must be one of"):
        DinatConfig(na_backend="cuda")
    with pytest.raises(ValueError, match="use_rpb must be True or False"):
        DinatConfig(use_rpb="no")


def _tiny_config(**kwargs) -> DinatConfig:
    return DinatConfig(embed_dim=16, depths=[1, 2], num_heads=[2, 4], dilations=[[2], [1, 2]], kernel_size=3,
                       num_labels=5, drop_path_rate=0.0, **kwargs)


def test_model_without_rpb_has_no_rpb_and_its_backends_agree():
    torch.manual_seed(0)
    model = DinatForImageClassification(_tiny_config(use_rpb=False)).eval()
    assert not any("rpb" in name for name in model.state_dict())
    pixels = torch.randn(2, 3, 64, 48)
    with ops.use_backend("torch"), torch.no_grad():
        expected = model(pixels).logits
    # the unfused path (output_attentions) is an independent route through the same weights
    with torch.no_grad():
        unfused = model(pixels, output_attentions=True).logits
    torch.testing.assert_close(unfused, expected, atol=1e-5, rtol=1e-5)
    for backend in ("flex", "natten"):
        probe = torch.zeros(1, 2, 16, 12, 8)
        reason = dispatch.why_not(backend, probe, has_rpb=False, needs_grad=False)
        if reason is not None:
            continue
        with ops.use_backend(backend), torch.no_grad():
            torch.testing.assert_close(model(pixels).logits, expected, atol=1e-4, rtol=1e-4)
    # the config field forces the backend for every layer
    forced = DinatForImageClassification(_tiny_config(use_rpb=True, na_backend="natten"))
    if dispatch.natten_version() is None or dispatch.natten_version() >= (0, 20):
        with pytest.raises(ValueError, match="backend 'natten' cannot run"):
            forced(pixels)


def test_dinat_imports_and_runs_without_natten(tmp_path):
    # a meta-path hook makes `import natten` fail as if it were not installed
    script = textwrap.dedent("""
        import importlib.abc, sys
        class BlockNatten(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "natten" or name.startswith("natten."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None
        sys.meta_path.insert(0, BlockNatten())
        import torch, dinat
        from dinat.ops import dispatch
        assert dispatch.natten_version() is None, dispatch.natten_version()
        config = dinat.DinatConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 4], dilations=[[1], [1]],
                                   kernel_size=3, use_rpb=False, num_labels=3)
        model = dinat.DinatForImageClassification(config)
        model(torch.randn(1, 3, 32, 32)).logits.sum().backward()
        try:
            with dinat.ops.use_backend("natten"):
                model(torch.randn(1, 3, 32, 32))
        except ValueError as err:
            assert "NATTEN is not installed" in str(err), err
        else:
            raise AssertionError("forcing natten without NATTEN must fail")
        assert "natten" not in sys.modules
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_REASON)
def test_automatic_choice_on_cuda_prefers_fused_kernels():
    q = torch.zeros(1, 2, 16, 16, 32, device="cuda", dtype=torch.float16)
    name = dispatch.choose(None, q, has_rpb=True, needs_grad=False, kernel_size=(7, 7), dilation=(1, 1))
    expected = "natten" if dispatch.why_not("natten", q, True, False) is None else (
        "flex" if dispatch.flex_available() else "torch")
    assert name == expected
