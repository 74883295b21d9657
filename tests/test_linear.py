"""`ops.linear` in bfloat16 on CPUs without bfloat16 instructions: the float32 GEMM on bfloat16-rounded operands,
rounded once, must be the bfloat16 linear (checked against float64 arithmetic on the rounded operands, and against
torch's own bfloat16 linear), and it must run only where the CPU lacks those instructions."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from dinat import ops

linear_module = importlib.import_module("dinat.ops.linear")

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused linears need oneDNN")

EPILOGUES = ["none", "gelu", "residual"]


def _operands(epilogue: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    # values off the bfloat16 grid: a kernel that skipped rounding the operands would be off by more than an ulp
    x = torch.randn(3, 37, 96, generator=generator, dtype=torch.float64).mul(1 + 2 ** -10)
    weight = torch.randn(80, 96, generator=generator, dtype=torch.float64) / 8
    bias = torch.randn(80, generator=generator, dtype=torch.float64)
    residual = torch.randn(3, 37, 80, generator=generator, dtype=torch.float64) if epilogue == "residual" else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), weight.float(), bias.float(), epilogue == "gelu", cast(residual)


def _bf16_reference(x, weight, bias, gelu, residual) -> torch.Tensor:
    """float64 arithmetic on the bfloat16-rounded operands, rounded to bfloat16 once."""
    def rounded(t):
        return None if t is None else t.to(torch.bfloat16).double()

    out = F.linear(rounded(x), rounded(weight), rounded(bias))
    out = F.gelu(out) if gelu else out
    out = out + rounded(residual) if residual is not None else out
    return out.to(torch.bfloat16)


def _epilogue_dtypes(monkeypatch) -> list[torch.dtype]:
    """Records the dtype of x in each call of the oneDNN op."""
    seen = []
    op = linear_module._linear_epilogue

    def recording(x, *args):
        seen.append(x.dtype)
        return op(x, *args)

    monkeypatch.setattr(linear_module, "_linear_epilogue", recording)
    return seen


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_linear_without_bf16_instructions_is_the_bf16_linear(monkeypatch, epilogue, input_dtype):
    monkeypatch.setattr(linear_module, "_BF16_IN_HARDWARE", False)
    seen = _epilogue_dtypes(monkeypatch)
    x, weight, bias, gelu, residual = _operands(epilogue, input_dtype)
    if residual is not None:
        residual = residual.bfloat16()  # the residual add is fused where it has the linear's dtype
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.linear(x, weight, bias, gelu=gelu, residual=residual)
        torch_bf16 = F.linear(x, weight, bias)
    assert seen == [torch.float32], "the float32 kernel runs"
    assert got.dtype == torch.bfloat16
    want = _bf16_reference(x, weight, bias, gelu, residual)
    # one rounding to bfloat16: at most an ulp (2**-8 relative) from the exactly summed value's rounding
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-5)
    if epilogue == "none":
        torch.testing.assert_close(got.float(), torch_bf16.float(), rtol=2 ** -7, atol=1e-5)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_bf16_model_weights_without_autocast_take_the_same_path(monkeypatch, epilogue):
    monkeypatch.setattr(linear_module, "_BF16_IN_HARDWARE", False)
    seen = _epilogue_dtypes(monkeypatch)
    x, weight, bias, gelu, residual = _operands(epilogue, torch.bfloat16)
    weight, bias = weight.bfloat16(), bias.bfloat16()
    with torch.inference_mode():
        got = ops.linear(x, weight, bias, gelu=gelu, residual=residual)
    assert seen == [torch.float32] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _bf16_reference(x, weight, bias, gelu, residual).float(), rtol=2 ** -7,
                               atol=1e-5)


def test_cpus_with_bf16_instructions_keep_onednns_bf16_gemm(monkeypatch):
    monkeypatch.setattr(linear_module, "_BF16_IN_HARDWARE", True)
    seen = _epilogue_dtypes(monkeypatch)
    x, weight, bias, gelu, residual = _operands("gelu", torch.float32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.linear(x, weight, bias, gelu=gelu)
    assert seen == [torch.bfloat16] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _bf16_reference(x, weight, bias, gelu, None).float(), rtol=2 ** -7,
                               atol=1e-2)


def test_float32_linears_are_untouched(monkeypatch):
    monkeypatch.setattr(linear_module, "_BF16_IN_HARDWARE", False)
    seen = _epilogue_dtypes(monkeypatch)
    x, weight, bias, gelu, residual = _operands("residual", torch.float32)
    with torch.inference_mode():
        got = ops.linear(x, weight, bias, residual=residual)
    assert seen == [torch.float32]
    torch.testing.assert_close(got, F.linear(x, weight, bias) + residual)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True),
                                                         (False, True, True)])
def test_bf16_instructions_are_read_from_torch(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert linear_module._cpu_has_bf16_dot_products() is expected


def test_unknown_cpus_keep_the_bf16_gemm(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert linear_module._cpu_has_bf16_dot_products() is True
