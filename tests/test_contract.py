"""The contract every head keeps (DinatModel, DinatForImageClassification, DinatBackbone), checked the same way for
each: initialization, save/load, output structure, gradient checkpointing, torch.compile.

The expected shapes and tuple orders are written out for the tiny config (conftest.TINY: stage widths 16, 32, 64,
heads 2, 4, 8, K=3) on a 64x48 input; the tuple orders are transformers' DiNAT output classes'.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import count_layer_calls, tiny_model
from dinat import DinatBackbone, DinatForImageClassification, DinatModel
from dinat.modeling_dinat import DinatLayer

HEADS = [DinatModel, DinatForImageClassification, DinatBackbone]
OVERRIDES = dict(layer_scale_init_value=0.1, out_features=["stem", "stage1", "stage3"])
BATCH, HEIGHT, WIDTH = 2, 64, 48

# (B, H, W, C) after the patch embedding and after each stage (downsampled, except the last), and the
# attention weights (B, heads, H, W, K*K) of each stage's last layer
HIDDEN_STATES = [(2, 16, 12, 16), (2, 8, 6, 32), (2, 4, 3, 64), (2, 4, 3, 64)]
BACKBONE_HIDDEN_STATES = [(2, 16, 12, 16), (2, 16, 12, 16), (2, 8, 6, 32), (2, 4, 3, 64)]  # before downsampling
ATTENTIONS = [(2, 2, 16, 12, 9), (2, 4, 8, 6, 9), (2, 8, 4, 3, 9)]
FEATURE_MAPS = [(2, 16, 16, 12), (2, 16, 16, 12), (2, 64, 4, 3)]  # stem, stage1, stage3: (B, C, H, W)
# return_dict=False: the fields in tuple order, when every output is asked for
TUPLE_ORDER = {
    DinatModel: ["last_hidden_state", "pooler_output", "hidden_states", "attentions", "reshaped_hidden_states"],
    DinatForImageClassification: ["loss", "logits", "hidden_states", "attentions", "reshaped_hidden_states"],
    DinatBackbone: ["feature_maps", "hidden_states", "attentions"],
}


def head_id(cls) -> str:
    return cls.__name__


def inputs(cls, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(BATCH, 3, HEIGHT, WIDTH, generator=generator)
    if cls is DinatForImageClassification:
        return {"pixel_values": pixels, "labels": torch.tensor([0, 2])}
    return {"pixel_values": pixels}


def main_outputs(cls, outputs) -> list[torch.Tensor]:
    """The tensors each head exists to produce."""
    if cls is DinatModel:
        return [outputs.last_hidden_state, outputs.pooler_output]
    if cls is DinatForImageClassification:
        return [outputs.loss, outputs.logits]
    return list(outputs.feature_maps)


def scalar_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A loss that weighs every element differently (a plain sum would hide swapped elements)."""
    generator = torch.Generator().manual_seed(7)
    return sum((t * torch.randn(t.shape, generator=generator)).sum() for t in tensors)


def assert_same(got, expected, atol: float = 0.0, rtol: float = 0.0, what: str = "") -> None:
    if isinstance(expected, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(expected), what
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, atol, rtol, f"{what}[{i}]")
    else:
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, msg=what)


# -------------------------------------------------------------------------------------------------
# Initialization
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", HEADS, ids=head_id)
def test_init_is_deterministic_under_a_seed(cls):
    first, again, other = (tiny_model(cls, seed=s, **OVERRIDES).state_dict() for s in (0, 0, 1))
    assert list(first) == list(again)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert any(not torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize("cls", HEADS, ids=head_id)
def test_init_follows_transformers_dinat(cls):
    """Linear and conv weights ~ N(0, initializer_range) with zero biases, layer norms at (1, 0) and layer scale at
    layer_scale_init_value, as transformers' DiNAT initializes them; the RPB ~ N(0, initializer_range) (truncated
    at +-2, so in effect untruncated), as the original NAT/DiNAT code does (transformers' leaves it at 0)."""
    model = tiny_model(cls, **OVERRIDES)
    std = model.config.initializer_range
    weights, rpbs, layers_seen = [], [], 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weights.append(module.weight.detach().flatten())
            if module.bias is not None:
                assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, DinatLayer):
            layers_seen += 1
            assert torch.equal(module.layer_scale_parameters,
                               torch.full_like(module.layer_scale_parameters, 0.1)), name
            rpbs.append(module.attention.self.rpb.detach().flatten())
    assert layers_seen == 4
    for what, values in (("linear and conv weights", torch.cat(weights)), ("rpb", torch.cat(rpbs))):
        # thousands of draws (400 for the RPB): the sample std is within 10% of std, the mean near 0
        assert abs(values.std().item() / std - 1) < 0.1, what
        assert abs(values.mean().item()) < 0.2 * std, what


# -------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", HEADS, ids=head_id)
def test_save_load_round_trip_gives_identical_outputs(cls, tmp_path):
    model = tiny_model(cls, **OVERRIDES).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "dinat"
    reloaded = cls.from_pretrained(tmp_path).eval()
    assert type(reloaded) is cls and reloaded.config.architectures == [cls.__name__]
    where_from = ("_name_or_path", "architectures")
    assert ({k: v for k, v in reloaded.config.to_dict().items() if k not in where_from}
            == {k: v for k, v in model.config.to_dict().items() if k not in where_from})
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert list(reloaded_state) == list(state)
    for key, value in state.items():
        assert torch.equal(reloaded_state[key], value), key
    with torch.no_grad():
        assert_same(main_outputs(cls, reloaded(**inputs(cls))), main_outputs(cls, model(**inputs(cls))))


# -------------------------------------------------------------------------------------------------
# Output structure
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=HEADS, ids=head_id)
def every_output(request):
    """(cls, dict outputs, tuple outputs) of one head asked for hidden states and attentions."""
    cls = request.param
    model = tiny_model(cls, **OVERRIDES).eval()
    with torch.no_grad():
        as_dict = model(**inputs(cls), output_hidden_states=True, output_attentions=True)
        as_tuple = model(**inputs(cls), output_hidden_states=True, output_attentions=True, return_dict=False)
    return cls, as_dict, as_tuple


def test_shapes_of_every_output(every_output):
    cls, out, _ = every_output
    expected_hidden = BACKBONE_HIDDEN_STATES if cls is DinatBackbone else HIDDEN_STATES
    assert [tuple(h.shape) for h in out.hidden_states] == expected_hidden
    assert [tuple(a.shape) for a in out.attentions] == ATTENTIONS
    for weights in out.attentions:  # the weights of each query's window sum to one
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    if cls is DinatBackbone:
        assert [tuple(m.shape) for m in out.feature_maps] == FEATURE_MAPS
        return
    assert [tuple(h.shape) for h in out.reshaped_hidden_states] == [(b, c, h, w) for b, h, w, c in HIDDEN_STATES]
    for flat, reshaped in zip(out.hidden_states, out.reshaped_hidden_states):
        assert torch.equal(reshaped, flat.permute(0, 3, 1, 2))
    if cls is DinatModel:
        assert out.last_hidden_state.shape == HIDDEN_STATES[-1] and out.pooler_output.shape == (2, 64)
    else:
        assert out.logits.shape == (2, 3) and out.loss.shape == ()


def test_tuple_output_is_the_dict_in_transformers_order(every_output):
    cls, as_dict, as_tuple = every_output
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(TUPLE_ORDER[cls])
    for position, name in enumerate(TUPLE_ORDER[cls]):
        assert_same(as_tuple[position], as_dict[name], what=name)


@pytest.mark.parametrize("cls", HEADS, ids=head_id)
def test_outputs_not_asked_for_are_absent(cls):
    model = tiny_model(cls, **OVERRIDES).eval()
    with torch.no_grad():
        out = model(**inputs(cls))
        as_tuple = model(**inputs(cls), return_dict=False)
    assert out.hidden_states is None and out.attentions is None
    assert len(as_tuple) == len([name for name in TUPLE_ORDER[cls] if "hidden_states" not in name
                                 and name != "attentions"])


# -------------------------------------------------------------------------------------------------
# Gradient checkpointing
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", HEADS, ids=head_id)
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(cls):
    model = tiny_model(cls, **OVERRIDES).train()  # dropout and drop path are 0: train mode is deterministic

    def step():
        model.zero_grad()
        outputs = main_outputs(cls, model(**inputs(cls)))
        scalar_of(outputs).backward()
        return [t.detach() for t in outputs], {name: p.grad.clone() for name, p in model.named_parameters()}

    expected_outputs, expected_grads = step()
    model.activation_checkpointing_enable()  # transformers 5's name of gradient_checkpointing_enable
    calls = count_layer_calls(model)
    outputs, grads = step()
    assert calls and set(calls.values()) == {2}  # every layer ran again in backward
    assert_same(outputs, expected_outputs, what="outputs")
    assert list(grads) == list(expected_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)


# -------------------------------------------------------------------------------------------------
# torch.compile
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", HEADS, ids=head_id)
def test_compiles_as_one_graph_with_eager_outputs(cls):
    # aot_eager traces what inductor compiles (one full graph, functionalized) without generating code;
    # inductor itself is in test_training.py (slow); fullgraph: any graph break is an error
    torch._dynamo.reset()
    model = tiny_model(cls, **OVERRIDES).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = main_outputs(cls, compiled(**inputs(cls)))
        expected = main_outputs(cls, model(**inputs(cls)))
    assert_same(got, expected, atol=1e-5, rtol=1e-5)
