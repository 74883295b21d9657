"""`dinat.ops.layer_norm`: the C++ row kernel agrees with a float64 LayerNorm and runs where it should (CPU float32
inference, and bfloat16 with float32 weight and bias as under autocast, eager or compiled, channels a multiple of
16) and nowhere else; compiled CPU training runs the opaque aten-backed op, whose values and gradients are
F.layer_norm's; the model's norms use both while keeping nn.LayerNorm's parameters, keys and gradients."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from dinat import DinatConfig, DinatModel, ops
from dinat.modeling_dinat import DinatLayerNorm
from dinat.ops import cpp_backend

layer_norm_module = importlib.import_module("dinat.ops.layer_norm")


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if cpp_backend.unavailable_reason() is not None:
        pytest.skip(cpp_backend.unavailable_reason())


def _reference(x, weight, bias, eps):
    return F.layer_norm(x.double(), (x.shape[-1],), weight.double(), bias.double(), eps)


@pytest.mark.parametrize("shape", [(2, 56, 56, 64), (3, 5, 7, 96), (1, 7, 7, 512), (257, 128)], ids=str)
def test_kernel_matches_a_float64_layer_norm(shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3 + 1.5
    weight, bias = torch.randn(shape[-1], generator=generator), torch.randn(shape[-1], generator=generator)
    assert layer_norm_module._kernel_applies(x, weight, bias)
    with torch.no_grad():
        got = ops.layer_norm(x, weight, bias, 1e-5)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), _reference(x, weight, bias, 1e-5), atol=1e-5, rtol=1e-5)


def test_other_calls_run_f_layer_norm():
    x = torch.randn(2, 4, 4, 64)
    weight, bias = torch.randn(64), torch.randn(64)
    assert not layer_norm_module._kernel_applies(x, weight.requires_grad_(), bias)  # gradients needed
    with torch.no_grad():
        assert layer_norm_module._kernel_applies(x, weight, bias)
        assert not layer_norm_module._kernel_applies(x[..., :40], weight[:40], bias[:40])  # 40 channels
        assert not layer_norm_module._kernel_applies(x.double(), weight.double(), bias.double())
        assert not layer_norm_module._kernel_applies(x, None, None)
        odd = torch.randn(3, 40)
        torch.testing.assert_close(ops.layer_norm(odd, torch.ones(40), torch.zeros(40), 1e-5),
                                   F.layer_norm(odd, (40,), eps=1e-5))


def test_bfloat16_rows_are_normalized_in_float32_and_rounded_once():
    # autocast's LayerNorm: bfloat16 activations, float32 weight and bias, bfloat16 out (aten's mixed-dtype kernel)
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 9, 11, 128, generator=generator) * 3 + 1.5).bfloat16()
    x[0, 0, 0, 5] = float("nan")
    weight, bias = torch.randn(128, generator=generator), torch.randn(128, generator=generator)
    assert layer_norm_module._kernel_applies(x, weight, bias)
    assert not layer_norm_module._kernel_applies(x, weight.bfloat16(), bias.bfloat16())  # F.layer_norm's own dtype
    with torch.no_grad():
        got = ops.layer_norm(x, weight, bias, 1e-5)
        float32_rows = ops.layer_norm(x.float(), weight, bias, 1e-5)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    # each value the float32 kernel's, rounded to nearest even (torch's rounding), a NaN row all NaN (its sign
    # bit is not compared: torch's conversion keeps it on CPUs with bfloat16 instructions only)
    nan_row = got[0, 0, 0]
    assert nan_row.isnan().all() and got.isnan().sum() == nan_row.numel()
    got[0, 0, 0] = float32_rows[0, 0, 0] = 0
    assert torch.equal(got.view(torch.int16), float32_rows.bfloat16().view(torch.int16))
    reference = _reference(x.float(), weight, bias, 1e-5).bfloat16()
    torch.testing.assert_close(got[1:], reference[1:], atol=0, rtol=2 ** -7)  # one bfloat16 step at most


def test_model_norms_use_the_kernel_under_bfloat16_autocast():
    model = _tiny_model()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fast = model(pixels).last_hidden_state
        events = {event.key for event in prof.key_averages()}
        assert "dinat::layer_norm_rows" in events and "aten::native_layer_norm" not in events
        norms = [m for m in model.modules() if isinstance(m, DinatLayerNorm)]
        for norm in norms:
            norm.forward = lambda x, norm=norm: F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        plain = model(pixels).last_hidden_state
    assert fast.dtype == plain.dtype
    torch.testing.assert_close(fast.float(), plain.float(), atol=2e-2, rtol=2e-2)


def _tiny_model():
    torch.manual_seed(0)
    config = DinatConfig(embed_dim=32, depths=[1, 1], num_heads=[2, 4], kernel_size=3, dilations=[[1], [1]],
                         mlp_ratio=2.0)
    return DinatModel(config).eval()


def test_model_norms_use_the_kernel_in_inference_and_keep_layer_norm_keys_and_gradients():
    model = _tiny_model()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m, DinatLayerNorm) for m in norms)
    assert "encoder.levels.0.layers.0.layernorm_before.weight" in model.state_dict()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fast = model(pixels).last_hidden_state
    assert any(event.key == "dinat::layer_norm_rows" for event in prof.key_averages())
    plain = model(pixels).last_hidden_state  # gradients enabled: F.layer_norm
    torch.testing.assert_close(fast, plain.detach(), atol=1e-5, rtol=1e-5)
    plain.sum().backward()
    assert all(m.weight.grad is not None and m.bias.grad is not None for m in norms)


def _ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages() if event.key.startswith("dinat::layer_norm")}


def test_training_op_registration_passes_opcheck():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=generator, requires_grad=True)
    weight = torch.randn(48, generator=generator, requires_grad=True)
    bias = torch.randn(48, generator=generator, requires_grad=True)
    torch.library.opcheck(torch.ops.dinat.layer_norm_train, (x, weight, bias, 1e-5))
    _, mean, rstd = (t.detach() for t in torch.ops.dinat.layer_norm_train(x, weight, bias, 1e-5))
    torch.library.opcheck(torch.ops.dinat.layer_norm_train_backward,
                          (torch.randn(3, 5, 48, generator=generator), x.detach(), mean, rstd, weight.detach(),
                           bias.detach()))


def test_compiled_training_runs_the_opaque_op_with_f_layer_norm_gradients():
    generator = torch.Generator().manual_seed(0)
    # a transposed (non-contiguous) input, as a permuted activation would be
    x = (torch.randn(6, 4, 64, generator=generator) * 2 + 1).transpose(0, 1)
    weight, bias = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    upstream = torch.randn(4, 6, 64, generator=generator)

    def loss(fn, x, weight, bias):
        x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
        (fn(x, weight, bias) * upstream).sum().backward()
        return x.grad, weight.grad, bias.grad

    compiled = torch.compile(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), backend="aot_eager", fullgraph=True)
    got = loss(compiled, x, weight, bias)
    assert _ops_run(lambda: loss(compiled, x, weight, bias)) == {"dinat::layer_norm_train",
                                                                  "dinat::layer_norm_train_backward"}
    want = loss(lambda x, w, b: F.layer_norm(x, (64,), w, b, 1e-5), x.double(), weight.double(), bias.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_inference_runs_the_row_kernel_where_the_width_allows(dynamic):
    generator = torch.Generator().manual_seed(0)
    compiled = torch.compile(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), fullgraph=True, dynamic=dynamic)
    for shape, kernel_runs in [((2, 5, 7, 64), True), ((3, 4, 6, 128), True), ((3, 4, 6, 40), False)]:
        x = torch.randn(shape, generator=generator) * 3 + 1.5
        weight, bias = torch.randn(shape[-1], generator=generator), torch.randn(shape[-1], generator=generator)
        with torch.no_grad():
            got = compiled(x, weight, bias)
            assert _ops_run(lambda: compiled(x, weight, bias)) == ({"dinat::layer_norm_rows"} if kernel_runs else set())
        torch.testing.assert_close(got.double(), _reference(x, weight, bias, 1e-5), atol=1e-5, rtol=1e-5)


def test_opaque_op_only_in_compiled_cpu_training():
    x, weight, bias = torch.randn(2, 8, 32), torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    compiled = torch.compile(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert "dinat::layer_norm_train" not in _ops_run(lambda: compiled(x, weight, bias))
    assert "dinat::layer_norm_train" not in _ops_run(lambda: ops.layer_norm(x, weight, bias, 1e-5).sum().backward())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "dinat::layer_norm_train" not in _ops_run(lambda: compiled(x, weight, bias))
    # bfloat16 activations with float32 parameters: F.layer_norm (aten's statistics would be float32)
    assert "dinat::layer_norm_train" not in _ops_run(lambda: compiled(x.bfloat16(), weight, bias))
    half = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    weight16, bias16 = (t.detach().bfloat16().requires_grad_() for t in (weight, bias))
    assert "dinat::layer_norm_train" in _ops_run(lambda: compiled(half, weight16, bias16).float().sum().backward())
