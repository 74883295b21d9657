"""torch.compile keeps the eager fast paths: the fused neighborhood-attention kernel (the C++ kernel,
`dinat::na2d_cpp` on inference's separate q, k, v projections and `dinat::na2d_cpp_packed` on training's packed
one, or the torch backend's tiled kernel, `dinat::na2d`, when that backend is chosen), the oneDNN linear
epilogues (`dinat::linear_epilogue`) in inference and the aten LayerNorm (`dinat::layer_norm_train`) in training
appear in the compiled graph as custom ops, instead of the graph falling back to plain ops (slower than eager on
CPU)."""

from __future__ import annotations

import pytest
import torch

from dinat import DinatConfig, DinatForImageClassification, ops
from dinat.ops import cpp_backend

SMALL = dict(embed_dim=16, depths=[2, 1], num_heads=[1, 2], kernel_size=3, dilations=[[1, 2], [1]], mlp_ratio=2.0,
             num_labels=3)


def _graph_ops(model, pixels) -> list[str]:
    """The call targets of the one graph dynamo captures for `model(pixels)` (fullgraph: a break fails)."""
    targets = []

    def record(gm, example_inputs):
        # custom ops show as their overload ("dinat.na2d") or, in older torch, as the op object
        targets.extend(getattr(node.target, "_qualname", str(node.target)).replace("::", ".").removesuffix(".default")
                       for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record, fullgraph=True)(pixels)
    return targets


# the attention op a compiled CPU graph holds: the C++ kernel where it builds (test_cpp_backend requires that it
# builds here), the torch backend's tiled kernel when that backend is asked for
INFERENCE_ATTENTION_OPS = [("auto", "dinat.na2d_cpp"), ("torch", "dinat.na2d")]
TRAINING_ATTENTION_OPS = [("auto", "dinat.na2d_cpp_packed"), ("torch", "dinat.na2d")]


def _small_model(backend: str) -> DinatForImageClassification:
    """The seeded SMALL classifier on `backend`; skips "auto" where the C++ kernel is absent."""
    if backend == "auto" and cpp_backend.unavailable_reason() is not None:
        pytest.skip(cpp_backend.unavailable_reason())
    torch.manual_seed(0)
    return DinatForImageClassification(DinatConfig(**SMALL, na_backend=backend))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused linears need oneDNN")
@pytest.mark.parametrize("backend, attention_op", INFERENCE_ATTENTION_OPS)
def test_compiled_inference_calls_the_eager_kernels(backend, attention_op):
    model = _small_model(backend).eval()
    with torch.no_grad():
        targets = _graph_ops(model, torch.randn(1, 3, 32, 32))
    layers = sum(SMALL["depths"])
    assert targets.count(attention_op) == layers
    assert not any(target.startswith("dinat.na2d") and target != attention_op for target in targets)
    # per layer: query, key, value, attention output (+ residual), MLP in (+ GELU), MLP out (+ residual)
    assert targets.count("dinat.linear_epilogue") == 6 * layers
    assert "dinat.layer_norm_train" not in targets


@pytest.mark.parametrize("backend, attention_op", TRAINING_ATTENTION_OPS)
def test_compiled_training_uses_autograd_ops_for_linears(backend, attention_op):
    # the oneDNN epilogues have no autograd: with gradients the graph holds plain linears (fused by inductor);
    # every LayerNorm is the opaque op with aten's kernels (inductor's CPU LayerNorm backward is slower)
    model = _small_model(backend).train()
    targets = _graph_ops(model, torch.randn(1, 3, 32, 32))
    assert "dinat.linear_epilogue" not in targets
    assert targets.count(attention_op) == sum(SMALL["depths"])
    norms = sum(isinstance(module, torch.nn.LayerNorm) for module in model.modules())
    assert norms and targets.count("dinat.layer_norm_train") == norms


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused linears need oneDNN")
@pytest.mark.parametrize("epilogue", ["none", "gelu", "residual"])
def test_linear_epilogue_op_passes_opcheck_and_matches_plain_ops(epilogue):
    if cpp_backend.unavailable_reason() is not None:  # the extension registers the op's kernel
        pytest.skip(cpp_backend.unavailable_reason())
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 8, generator=generator), torch.randn(6, 8, generator=generator), \
        torch.randn(6, generator=generator)
    residual = torch.randn(2, 5, 6, generator=generator) if epilogue == "residual" else None
    gelu = epilogue == "gelu"
    torch.library.opcheck(torch.ops.dinat.linear_epilogue.default, (x, weight, bias, gelu, residual))
    expected = torch.nn.functional.linear(x, weight, bias)
    expected = torch.nn.functional.gelu(expected) if gelu else expected
    expected = expected + residual if residual is not None else expected
    with torch.no_grad():
        torch.testing.assert_close(ops.linear(x, weight, bias, gelu=gelu, residual=residual), expected)

