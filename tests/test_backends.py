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

from conftest import tiny_model
from dinat import DinatConfig, ops
from dinat.ops import cpp_backend, dispatch, tiled, torch_backend, traced
from na_tester import NACase, reference_run

GPU_REASON = "no CUDA device here; GPU backends are tested on a GPU machine"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_REASON))]

CASES = [
    NACase(14, 14, 7, 1, 2, 2, 16),   # DiNAT's K=7: two tiles of 7 per axis
    NACase(13, 17, 3, 2, 1, 2, 16),   # uneven dilation groups on both axes
    NACase(16, 16, 7, 2, 1, 1, 16),   # groups of 8 x 8 with K=7
    NACase(21, 19, 5, 1, 1, 2, 16),   # partial last tiles
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("use_rpb", [True, False], ids=["rpb", "no_rpb"])
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backend_forward_matches_reference(case, backend, use_rpb, dtype, device):
    reference_run(case, use_rpb).check_backend(backend, dtype, device, backward=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_rpb", [True, False], ids=["rpb", "no_rpb"])
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_backend_backward_matches_reference(case, backend, use_rpb, dtype, device):
    reference_run(case, use_rpb).check_backend(backend, dtype, device, backward=True)


# Which forced tiles fit an axis with K=5, stated by hand (not by the planner's own predicate): a tile of T
# queries sees a halo of T + K - 1 keys, enough for every window inside the axis; a window clamped at an end
# reaches K - 1 = 4 keys into the axis, so the first tile and a partial last tile need more than K // 2 = 2
# queries. A tile at least as long as the axis is the whole axis.
TILES = [3, 4, 5, 6, 8, 11, 40]
FITTING_TILES = {  # length: tiles that fit (the last tile's queries, length % tile, in brackets for the rest)
    11: {4, 6, 8, 11, 40},    # 3 (2), 5 (1) leave a last tile of at most 2
    23: {4, 5, 6, 8, 40},     # 3 (2), 11 (1)
    17: {6, 11, 40},          # 3 (2), 4 (1), 5 (2), 8 (1)
    12: {3, 4, 6, 8, 40},     # 5 (2), 11 (1)
}


@pytest.mark.parametrize("path", [torch_backend.na2d, traced.na2d], ids=["eager-kernel", "traced"])
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("size", [(11, 23), (17, 12)], ids=str)
def test_torch_backend_every_tiling_matches_reference(size, tile, path):
    # forced tiles that leave partial last tiles and halos clamped at both ends, forward and backward; the eager
    # kernel and the traced (export) path read the same plan; a tile that does not fit is refused
    run = reference_run(NACase(*size, 5, 1, 1, 2, 4), seed=2)

    def tiled_na2d(q, k, v, rpb):
        return path(q, k, v, (5, 5), (1, 1), rpb=rpb, tile=tile)

    if all(tile in FITTING_TILES[length] for length in size):
        run.check(tiled_na2d, what=f"tile {tile}")
    else:
        with pytest.raises(ValueError, match="does not fit"):
            tiled_na2d(run.q, run.k, run.v, run.rpb)


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 10**9], ids=["tile-rows", "batch-items", "whole"])
def test_torch_backend_chunking_matches_reference(monkeypatch, chunk_bytes):
    # the scores are computed in chunks (batch items, or rows of tiles when one item is too big)
    monkeypatch.setattr(tiled, "CHUNK_BYTES", chunk_bytes)
    run = reference_run(NACase(20, 18, 5, 2, 3, 2, 4), seed=4)
    run.check(lambda q, k, v, rpb: torch_backend.na2d(q, k, v, (5, 5), (2, 2), rpb=rpb, tile=5),
              what=f"chunks of {chunk_bytes} bytes")


def _float32_inputs():
    run = reference_run(CASES[0])
    return [t.float() for t in run.leaves()]


def test_automatic_choice_without_the_cpp_kernel_is_torch_and_logged(caplog, monkeypatch):
    q, k, v, rpb = _float32_inputs()
    monkeypatch.setattr(cpp_backend, "can_run", lambda *args: "switched off for this test")
    with caplog.at_level(logging.DEBUG, logger="dinat.ops"):
        ops.na2d(q, k, v, 7, 1, rpb=rpb)
    assert any("backend torch (cpp: switched off for this test)" in record.getMessage() for record in caplog.records)


def test_forcing_a_backend_that_cannot_run_says_why():
    q, k, v, rpb = _float32_inputs()
    # flex attention has no backward on CPU in the pinned torch
    with pytest.raises(ValueError, match="backend 'flex' cannot run this call: .*no flex-attention backward"):
        ops.na2d(q.requires_grad_(), k, v, 7, 1, rpb=rpb, backend="flex")
    # NATTEN is either absent or (>= 0.20) without RPB: both are explained
    with pytest.raises(ValueError, match="backend 'natten' cannot run this call: .*(not installed|no relative)"):
        ops.na2d(q.detach(), k, v, 7, 1, rpb=rpb, backend="natten")
    with pytest.raises(ValueError, match="unknown neighborhood-attention backend 'cuda'"):
        ops.na2d(q.detach(), k, v, 7, 1, backend="cuda")


def test_context_manager_overrides_the_argument_and_restores():
    q, k, v, rpb = _float32_inputs()
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


@pytest.fixture(scope="module")
def model_without_rpb():
    """A tiny classifier without RPB, its input, and its logits on the torch backend."""
    model = tiny_model(use_rpb=False).eval()
    pixels = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with ops.use_backend("torch"), torch.no_grad():
        return model, pixels, model(pixels).logits


def test_model_without_rpb_has_no_rpb_and_its_unfused_path_agrees(model_without_rpb):
    model, pixels, expected = model_without_rpb
    assert not any("rpb" in name for name in model.state_dict())
    # the unfused path (output_attentions) is an independent route through the same weights
    with torch.no_grad():
        unfused = model(pixels, output_attentions=True).logits
    torch.testing.assert_close(unfused, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["flex", "natten"])
def test_model_without_rpb_agrees_on_every_backend(model_without_rpb, backend):
    model, pixels, expected = model_without_rpb
    probe = torch.zeros(2, 2, 16, 12, 8)  # the first stage's (batch, heads, H, W, head_dim)
    reason = dispatch.why_not(backend, probe, has_rpb=False, needs_grad=False)
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")
    with ops.use_backend(backend), torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, expected, atol=1e-4, rtol=1e-4)


def test_config_field_forces_the_backend_of_every_layer(model_without_rpb):
    _, pixels, _ = model_without_rpb
    forced = tiny_model(use_rpb=True, na_backend="natten")
    if dispatch.natten_version() is None or dispatch.natten_version() >= (0, 20):
        with pytest.raises(ValueError, match="backend 'natten' cannot run"):
            forced(pixels)
    else:  # NATTEN <= 0.17 has the RPB ops
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
@pytest.mark.parametrize("has_rpb", [True, False], ids=["rpb", "no_rpb"])
def test_automatic_choice_on_cuda_prefers_natten_then_torch(has_rpb):
    # stated from the installed NATTEN's version, not from the backends' own checks: NATTEN 0.17 runs layers with
    # and without RPB, NATTEN >= 0.20 only those without; otherwise torch (flex only when forced)
    q = torch.zeros(1, 2, 16, 16, 32, device="cuda", dtype=torch.float16)
    version = dispatch.natten_version()
    natten_runs_it = version is not None and version >= (0, 17) and (version < (0, 20) or not has_rpb)
    name = dispatch.choose(None, q, has_rpb=has_rpb, needs_grad=False, kernel_size=(7, 7), dilation=(1, 1))
    assert name == ("natten" if natten_runs_it else "torch")


@pytest.mark.skipif(not dispatch.flex_available(), reason="this torch has no flex attention")
def test_flex_block_mask_made_in_inference_mode_is_an_ordinary_tensor():
    # the mask is cached per shape: one first built during evaluation (inference_mode) is reused by training,
    # where autograd refuses to save inference tensors
    from dinat.ops import flex_backend

    flex_backend._block_mask.cache_clear()
    with torch.inference_mode():
        mask = flex_backend._block_mask(9, 11, (3, 3), (2, 1), "cpu")
    tensors = [t for t in vars(mask).values() if isinstance(t, torch.Tensor)]
    assert tensors and not any(t.is_inference() for t in tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_REASON)
def test_flex_model_trains_after_evaluation_on_cuda():
    model = tiny_model(na_backend="flex", num_heads=[1, 1, 1]).cuda()  # head_dim 16, 32, 64: compiled flex needs >= 16
    pixels = torch.randn(2, 3, 64, 64, device="cuda")
    model.eval()
    with torch.inference_mode():
        model(pixels)
    model.train()
    model(pixels, labels=torch.tensor([0, 1], device="cuda")).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
