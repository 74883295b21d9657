"""The CPU kernels behind DiNAT's ops (the C++ attention, the LayerNorm row kernel, the oneDNN linear epilogues) are
C++ kernels registered with torch's dispatcher by the extension: eager code and compiled graphs call the same op,
with no Python frame between the call and the kernel (a Python kernel costs tens of microseconds a call, and a
DiNAT-mini forward makes about 170), and whatever watches calls, such as the profiler, sees each op by name."""

from __future__ import annotations

import collections

import pytest
import torch

from dinat import DinatConfig, DinatForImageClassification
from dinat.ops import cpp_backend

SMALL = dict(embed_dim=16, depths=[2, 1], num_heads=[1, 2], kernel_size=3, dilations=[[1, 2], [1]], mlp_ratio=2.0,
             num_labels=3)
LAYERS = sum(SMALL["depths"])
OPS = ["na2d_cpp", "na2d_cpp_backward", "na2d_cpp_packed", "na2d_cpp_packed_backward", "layer_norm_rows",
       "linear_epilogue"]

pytestmark = [
    pytest.mark.skipif(cpp_backend.unavailable_reason() is not None, reason=str(cpp_backend.unavailable_reason())),
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused linears need oneDNN"),
]


@pytest.mark.parametrize("op", OPS)
def test_the_cpu_kernel_is_the_extensions_cpp_function(op):
    # torch's dump names where each kernel was registered; a Python kernel shows as boxed only, with no signature
    kernels = [line for line in torch._C._dispatch_dump(f"dinat::{op}").splitlines() if line.startswith("CPU:")]
    assert len(kernels) == 1, kernels
    assert "csrc/bindings.cpp" in kernels[0] and "unboxed" in kernels[0], kernels[0]


def _model() -> DinatForImageClassification:
    torch.manual_seed(0)
    return DinatForImageClassification(DinatConfig(**SMALL, na_backend="auto")).eval()


def _profiled_ops(run) -> collections.Counter:
    """How many times `run()` called each dinat:: op, as the profiler records them."""
    with torch.profiler.profile() as profile:
        run()
    return collections.Counter(event.name.removeprefix("dinat::") for event in profile.events()
                               if event.name.startswith("dinat::"))


@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad])
def test_inference_calls_the_ops_by_name(grad_mode):
    model, pixels = _model(), torch.randn(2, 3, 32, 32)
    with grad_mode():
        calls = _profiled_ops(lambda: model(pixels))
    # per layer: query, key, value (no grad: three matmuls), attention output, MLP in, MLP out; two norms; attention
    assert calls["linear_epilogue"] == 6 * LAYERS
    assert calls["na2d_cpp"] == LAYERS
    assert calls["layer_norm_rows"] >= 2 * LAYERS
    assert calls["na2d_cpp_packed"] == 0


def test_training_calls_the_packed_attention_and_its_backward():
    model = _model().train()

    def step():
        model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss.backward()

    calls = _profiled_ops(step)
    assert calls["na2d_cpp_packed"] == calls["na2d_cpp_packed_backward"] == LAYERS
    assert calls["na2d_cpp"] == calls["linear_epilogue"] == calls["layer_norm_rows"] == 0
    assert model.dinat.encoder.levels[0].layers[0].attention.self.rpb.grad is not None
