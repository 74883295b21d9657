"""bfloat16 linears and convolutions on CPUs without bfloat16 instructions (`dinat.ops.bfloat16`): the float32
kernel on bfloat16-rounded operands, rounded once, must give the bfloat16 result (checked against float64
arithmetic on the rounded operands, and against torch's own bfloat16 ops), and it must run only where the CPU
lacks those instructions and nothing needs gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dinat import ops
from dinat.ops import bfloat16, cpp_backend

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available()
                                  or cpp_backend.unavailable_reason() is not None,
                                  reason="the fused linears need oneDNN and the C++ extension that registers them")

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


def _rounded64(t: torch.Tensor | None) -> torch.Tensor | None:
    """The test's own rounding to bfloat16, held in float64 for the references."""
    return None if t is None else t.to(torch.bfloat16).double()


def _bf16_reference(x, weight, bias, gelu, residual) -> torch.Tensor:
    """float64 arithmetic on the bfloat16-rounded operands, rounded to bfloat16 once."""
    out = F.linear(_rounded64(x), _rounded64(weight), _rounded64(bias))
    out = F.gelu(out) if gelu else out
    out = out + _rounded64(residual) if residual is not None else out
    return out.to(torch.bfloat16)


def _run_linear(monkeypatch, in_hardware: bool, epilogue: str, input_dtype: torch.dtype, autocast: bool = True,
                weights_dtype: torch.dtype = torch.float32):
    """ops.linear on `_operands`, with the CPU said to have bfloat16 instructions or not. Returns the result, the
    operands and the dtype of x in each call of the oneDNN op."""
    monkeypatch.setattr(bfloat16, "BF16_IN_HARDWARE", in_hardware)
    x, weight, bias, gelu, residual = _operands(epilogue, input_dtype)
    weight, bias = weight.to(weights_dtype), bias.to(weights_dtype)
    if residual is not None and autocast:
        residual = residual.bfloat16()  # the residual add is fused where it has the linear's dtype
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            _EpilogueInputs() as seen:
        got = ops.linear(x, weight, bias, gelu=gelu, residual=residual)
    return got, (x, weight, bias, gelu, residual), seen.dtypes


class _EpilogueInputs(TorchDispatchMode):
    """Records the dtype of x in each call of the oneDNN linear op."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.dinat.linear_epilogue.default:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


# one rounding to bfloat16: at most an ulp (2**-8 relative) from the rounding of the exactly summed value
ONE_ULP = dict(rtol=2 ** -7, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_linear_without_bf16_instructions_is_the_bf16_linear(monkeypatch, epilogue, input_dtype):
    got, operands, seen = _run_linear(monkeypatch, False, epilogue, input_dtype)
    assert seen == [torch.float32], "the float32 kernel runs"
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _bf16_reference(*operands).float(), **ONE_ULP)
    if epilogue == "none":
        x, weight, bias, _, _ = operands
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(got.float(), F.linear(x, weight, bias).float(), **ONE_ULP)


@needs_onednn
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_bf16_model_weights_without_autocast_take_the_same_path(monkeypatch, epilogue):
    got, operands, seen = _run_linear(monkeypatch, False, epilogue, torch.bfloat16, autocast=False,
                                      weights_dtype=torch.bfloat16)
    assert seen == [torch.float32] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _bf16_reference(*operands).float(), **ONE_ULP)


@needs_onednn
def test_cpus_with_bf16_instructions_keep_onednns_bf16_gemm(monkeypatch):
    got, operands, seen = _run_linear(monkeypatch, True, "gelu", torch.float32)
    assert seen == [torch.bfloat16] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _bf16_reference(*operands).float(), rtol=2 ** -7, atol=1e-2)


@needs_onednn
def test_float32_linears_are_untouched(monkeypatch):
    got, (x, weight, bias, _, residual), seen = _run_linear(monkeypatch, False, "residual", torch.float32,
                                                            autocast=False)
    assert seen == [torch.float32]
    torch.testing.assert_close(got, F.linear(x, weight, bias) + residual)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True),
                                                         (False, True, True)])
def test_bf16_instructions_are_read_from_torch(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert bfloat16._cpu_has_bf16_dot_products() is expected


def test_unknown_cpus_keep_the_bf16_gemm(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert bfloat16._cpu_has_bf16_dot_products() is True


def _conv_operands(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(24, 40, kernel_size=3, stride=2, padding=1).to(torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64) / 8)
        conv.bias.copy_(torch.randn(40, generator=generator, dtype=torch.float64))
    x = torch.randn(2, 24, 15, 17, generator=generator, dtype=torch.float64).mul(1 + 2 ** -10)
    reference = torch.nn.Conv2d(24, 40, kernel_size=3, stride=2, padding=1).to(torch.float64)
    reference.load_state_dict({name: _rounded64(t) for name, t in conv.state_dict().items()})
    want = reference(_rounded64(x)).to(torch.bfloat16)
    return conv.float(), x.to(dtype), want


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_conv_without_bf16_instructions_is_the_bf16_conv(monkeypatch, input_dtype):
    monkeypatch.setattr(bfloat16, "BF16_IN_HARDWARE", False)
    conv, x, want = _conv_operands(input_dtype)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = bfloat16.conv2d(conv, x)
        torch_bf16 = conv(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), **ONE_ULP)
    torch.testing.assert_close(got.float(), torch_bf16.float(), rtol=2 ** -7, atol=2e-2)
    conv = conv.bfloat16()  # a bfloat16 model, no autocast
    with torch.inference_mode():
        torch.testing.assert_close(bfloat16.conv2d(conv, x.bfloat16()).float(), want.float(), **ONE_ULP)


def test_bf16_conv_keeps_torchs_path_with_gradients_or_bf16_hardware_or_a_dtype_mismatch(monkeypatch):
    conv, x, _ = _conv_operands(torch.float32)
    calls = []
    monkeypatch.setattr(conv, "_conv_forward", lambda *args: calls.append([a.dtype for a in args if a is not None])
                        or torch.nn.Conv2d._conv_forward(conv, *args))
    monkeypatch.setattr(bfloat16, "BF16_IN_HARDWARE", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bfloat16.conv2d(conv, x)  # the weight needs gradients: autocast's own conv
    assert out.requires_grad and calls == [[torch.float32] * 3]  # autocast casts below the module
    with torch.inference_mode(), pytest.raises(RuntimeError):
        bfloat16.conv2d(conv, x.bfloat16())  # float32 weights, bfloat16 input, no autocast: torch's error
    monkeypatch.setattr(bfloat16, "BF16_IN_HARDWARE", True)
    calls.clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert bfloat16.conv2d(conv, x).dtype == torch.bfloat16
    assert calls == [[torch.float32] * 3]


def test_model_bf16_inference_without_bf16_instructions_matches_onednns_bf16_and_float32(monkeypatch):
    from dinat import DinatConfig, DinatForImageClassification

    monkeypatch.setattr(bfloat16, "BF16_IN_HARDWARE", False)
    torch.manual_seed(0)
    model = DinatForImageClassification(DinatConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3,
                                                    dilations=[[1], [1]], num_labels=3)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        full = model(pixels).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = model(pixels).logits
        monkeypatch.setattr(bfloat16, "BF16_IN_HARDWARE", True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            onednn = model(pixels).logits
    assert ours.dtype == onednn.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), onednn.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours.float(), full, atol=5e-2, rtol=5e-2)
