"""Plain eager inference calls the CPU kernels (oneDNN linears, the LayerNorm row kernel, the C++ attention)
directly, without the custom ops that wrap them; wherever something watches or rewrites calls (a dispatch mode
such as FLOP counting, the profiler) and wherever autograd records, the custom ops run, with the same results."""

from __future__ import annotations

import collections
import importlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dinat import DinatConfig, DinatForImageClassification
from dinat.ops import cpp_backend

# the modules (`dinat.ops.linear` and `.layer_norm` are also the names of the functions they export)
linear = importlib.import_module("dinat.ops.linear")
layer_norm = importlib.import_module("dinat.ops.layer_norm")

SMALL = dict(embed_dim=16, depths=[2, 1], num_heads=[1, 2], kernel_size=3, dilations=[[1, 2], [1]], mlp_ratio=2.0,
             num_labels=3)
LAYERS = sum(SMALL["depths"])

# (module, the custom op's name there, the plain kernel function's name there)
# (inference projects q, k and v separately; training packs them: its attention gradient comes back packed)
ROUTES = {"linear": (linear, "_linear_epilogue_op", "_onednn_linear"),
          "layer_norm": (layer_norm, "_layer_norm_rows", "_row_kernel"),
          "attention": (cpp_backend, "_na2d_op", "_forward"),
          "packed attention": (cpp_backend, "_na2d_packed_op", "_forward_packed")}

pytestmark = [
    pytest.mark.skipif(cpp_backend.unavailable_reason() is not None, reason=str(cpp_backend.unavailable_reason())),
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused linears need oneDNN"),
]


@pytest.fixture
def calls(monkeypatch):
    """Counts, per route, the calls that went through the custom op ("op") and to the kernel directly ("direct")."""
    counted, inside = collections.Counter(), [0]
    for name, (module, op_name, kernel_name) in ROUTES.items():
        op, kernel = getattr(module, op_name), getattr(module, kernel_name)

        def through_op(*args, _op=op, _name=name):
            counted[_name, "op"] += 1
            inside[0] += 1  # the op's implementation calls the kernel functions too: not direct calls
            try:
                return _op(*args)
            finally:
                inside[0] -= 1

        def direct(*args, _kernel=kernel, _name=name):
            if not inside[0]:
                counted[_name, "direct"] += 1
            inside[0] += 1  # a kernel that calls another (the packed one calls the plain one) is one direct call
            try:
                return _kernel(*args)
            finally:
                inside[0] -= 1

        monkeypatch.setattr(module, op_name, through_op)
        monkeypatch.setattr(module, kernel_name, direct)
    return counted


def _model() -> DinatForImageClassification:
    torch.manual_seed(0)
    return DinatForImageClassification(DinatConfig(**SMALL, na_backend="auto")).eval()


def test_plain_eager_inference_skips_the_custom_ops(calls):
    model, pixels = _model(), torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model(pixels)
    assert not any(route == "op" for _, route in calls), dict(calls)
    # per layer: query, key, value (no grad: three matmuls), attention output, MLP in, MLP out; two norms; attention
    assert calls["linear", "direct"] == 6 * LAYERS
    assert calls["attention", "direct"] == LAYERS
    assert calls["layer_norm", "direct"] >= 2 * LAYERS


@pytest.mark.parametrize("watcher", ["flop_counter", "profiler"])
def test_watched_inference_runs_the_custom_ops_with_the_same_logits(calls, watcher):
    model, pixels = _model(), torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        plain = model(pixels).logits
        calls.clear()
        context = FlopCounterMode(display=False) if watcher == "flop_counter" else torch.profiler.profile()
        with context:
            watched = model(pixels).logits
    assert calls["linear", "op"] == 6 * LAYERS
    assert calls["attention", "op"] == LAYERS
    assert calls["layer_norm", "op"] >= 2 * LAYERS
    torch.testing.assert_close(watched, plain, rtol=0, atol=0)


def test_eager_training_keeps_the_attention_op_for_its_autograd(calls):
    model = _model().train()
    out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert calls["packed attention", "op"] == LAYERS
    assert calls["packed attention", "direct"] == calls["attention", "direct"] == calls["attention", "op"] == 0
    assert model.dinat.encoder.levels[0].layers[0].attention.self.rpb.grad is not None
