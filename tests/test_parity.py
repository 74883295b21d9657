"""Parity with the reference stack (transformers 4.46.3 modeling_dinat + NATTEN 0.17.5 kernels), float32.

Golden data: tests/fixtures/cases/<case>/io.safetensors, made by the oracle's make_fixtures.py.
Outputs must agree within 1e-4 absolute and relative; every gradient within 1e-4 of that gradient's largest
magnitude (plus 1e-7 absolute: key-projection bias gradients are analytically zero, since softmax is invariant
to a per-query shift, and both stacks return rounding noise of ~1e-8 there).
"""

import json

import pytest
import torch

from conftest import CASES, REFERENCE_TOL, case_io, load_case
from dinat import DinatBackbone, DinatForImageClassification

MODEL_CASES = ["tiny_pad", "odd_shapes", "mini_layout"]


@pytest.fixture(scope="module", params=MODEL_CASES)
def case(request):
    name = request.param
    return name, case_io(name)


@pytest.mark.parametrize("weights", ["model", "model_bin"])
def test_outputs_match_reference(case, weights):
    name, io = case
    if not (CASES / name / weights).exists():
        pytest.skip(f"{name} has no {weights} checkpoint")
    model, _ = load_case(name, weights)
    x = io["pixel_values"]
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_attentions=True)
        base = model.dinat(x)
    torch.testing.assert_close(out.logits, io["logits"], **REFERENCE_TOL)
    torch.testing.assert_close(base.last_hidden_state, io["last_hidden_state"], **REFERENCE_TOL)
    torch.testing.assert_close(base.pooler_output, io["pooler_output"], **REFERENCE_TOL)
    n_stages = len(model.config.depths)
    assert len(out.hidden_states) == len(out.reshaped_hidden_states) == n_stages + 1
    assert len(out.attentions) == n_stages
    for i in range(n_stages + 1):
        torch.testing.assert_close(out.hidden_states[i], io[f"hidden_states.{i}"], **REFERENCE_TOL)
        torch.testing.assert_close(out.reshaped_hidden_states[i], io[f"reshaped_hidden_states.{i}"], **REFERENCE_TOL)
    for i in range(n_stages):
        torch.testing.assert_close(out.attentions[i], io[f"attentions.{i}"], **REFERENCE_TOL)


def test_loss_and_gradients_match_reference(case):
    name, io = case
    model, _ = load_case(name)
    model.train()  # the fixture's dropout and drop path are 0
    out = model(io["pixel_values"], labels=io["labels"])
    out.loss.backward()
    torch.testing.assert_close(out.loss.reshape(1), io["loss"], **REFERENCE_TOL)
    checked = 0
    for pname, param in model.named_parameters():
        if f"grad.{pname}" not in io:
            continue
        want = io[f"grad.{pname}"]
        tol = 1e-4 * want.abs().max().item() + 1e-7
        torch.testing.assert_close(param.grad, want, atol=tol, rtol=0, msg=lambda m: f"{pname}: {m}")
        checked += 1
    expected = sum(1 for k in io if k.startswith("grad."))
    assert checked == expected > 0


def test_backbone_feature_maps_match_reference(case):
    name, io = case
    meta = json.loads((CASES / name / "case.json").read_text())
    if meta["backbone_out_features"] is None:
        pytest.skip(f"{name} has no backbone fixture")
    backbone, _ = load_case(name, "backbone", DinatBackbone)
    assert backbone.out_features == meta["backbone_out_features"]
    with torch.no_grad():
        maps = backbone(io["pixel_values"]).feature_maps
    assert len(maps) == len(meta["backbone_out_features"])
    for i, fm in enumerate(maps):
        torch.testing.assert_close(fm, io[f"backbone.feature_maps.{i}"], **REFERENCE_TOL)
    assert backbone.channels == [fm.shape[1] for fm in maps]


def test_state_dict_keys_and_shapes_match_checkpoints(case):
    from safetensors import safe_open

    name, _ = case
    for folder, cls in (("model", DinatForImageClassification), ("backbone", DinatBackbone)):
        path = CASES / name / folder
        if not path.exists():
            continue
        with safe_open(path / "model.safetensors", "pt") as f:
            expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        config = cls.config_class.from_pretrained(path)
        with torch.device("meta"):
            model = cls(config)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
