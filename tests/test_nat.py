"""NAT checkpoints (transformers' `model_type` "nat": DiNAT's blocks without dilation, trunk under `nat.`)
load into the DiNAT classes with every dilation 1 and match the reference NAT's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import CASES, REFERENCE_TOL, case_io
from dinat import DinatBackbone, DinatConfig, DinatForImageClassification, DinatModel

CASE = CASES / "nat_small"
CHECKPOINT = CASE / "model"


@pytest.fixture(scope="module")
def io():
    return case_io("nat_small")


@pytest.fixture(scope="module")
def raw_config():
    return json.loads((CHECKPOINT / "config.json").read_text())


def test_nat_config_becomes_dinat_without_dilation(raw_config):
    assert raw_config["model_type"] == "nat" and "dilations" not in raw_config
    expected = [[1] * depth for depth in raw_config["depths"]]
    for config in (DinatConfig.from_pretrained(CHECKPOINT), DinatConfig.from_dict(dict(raw_config)),
                   DinatConfig(**raw_config)):
        assert config.model_type == "dinat"
        assert config.dilations == expected
        assert config.depths == raw_config["depths"] and config.kernel_size == raw_config["kernel_size"]
        assert config.num_labels == 3
    assert DinatConfig.from_pretrained(CHECKPOINT).architectures == ["DinatForImageClassification"]


def test_nat_classifier_matches_reference_logits_and_hidden_states(io):
    model, info = DinatForImageClassification.from_pretrained(CHECKPOINT, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    with torch.no_grad():
        out = model(io["pixel_values"], output_hidden_states=True)
    torch.testing.assert_close(out.logits, io["logits"], **REFERENCE_TOL)
    expected_hidden = sorted(k for k in io if k.startswith("hidden_states."))
    assert len(out.hidden_states) == len(expected_hidden)
    for i, hidden in enumerate(out.hidden_states):
        torch.testing.assert_close(hidden, io[f"hidden_states.{i}"], **REFERENCE_TOL)


def test_nat_weights_load_into_model_and_backbone(io):
    with safe_open(str(CHECKPOINT / "model.safetensors"), "pt") as f:
        stem_weight = f.get_tensor("nat.embeddings.patch_embeddings.projection.0.weight")

    base, info = DinatModel.from_pretrained(CHECKPOINT, output_loading_info=True)
    assert not info["missing_keys"], info
    with torch.no_grad():
        out = base.eval()(io["pixel_values"], output_hidden_states=True)
    for i, hidden in enumerate(out.hidden_states):
        torch.testing.assert_close(hidden, io[f"hidden_states.{i}"], **REFERENCE_TOL)

    backbone = DinatBackbone.from_pretrained(CHECKPOINT, out_features=["stage1", "stage3"])
    torch.testing.assert_close(backbone.embeddings.patch_embeddings.projection[0].weight, stem_weight)
    with torch.no_grad():
        maps = backbone.eval()(io["pixel_values"]).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 16, 20, 22), (2, 64, 5, 6)]


def test_nat_checkpoint_saves_as_dinat(tmp_path, io):
    model = DinatForImageClassification.from_pretrained(CHECKPOINT).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dinat" and saved["dilations"] == [[1, 1], [1], [1]]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("nat.") for k in keys)
    assert any(k.startswith("dinat.encoder.") for k in keys)
    reloaded = DinatForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(io["pixel_values"]).logits, io["logits"], **REFERENCE_TOL)
