"""What transformers' own code sees of this package: checkpoints plain transformers reads, error classes its
callers catch, its backbone API. (transformers' own DiNAT test suite runs in tests/transformers_suite/.)

Nothing here imports transformers' DiNAT modeling module (NATTEN >= 0.20 breaks its import): the checkpoint
layout is compared with a recording of it (tests/fixtures/transformers_layout.json)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dinat
from dinat import DinatBackbone, DinatConfig, DinatForImageClassification
from dinat.loading import CheckpointMismatchError

from conftest import FIXTURES, tiny_config

# transformers' own DiNAT classes for a small config, recorded by tests/fixtures/make_transformers_layout.py: that
# module cannot be imported here when NATTEN >= 0.20 is installed, and loading a checkpoint needs no more than
# these names and shapes
LAYOUT = json.loads((FIXTURES / "transformers_layout.json").read_text())
SMALL = LAYOUT["config"]


@pytest.mark.parametrize("cls_name", list(LAYOUT["state_dicts"]))
def test_saved_checkpoint_has_transformers_layout(tmp_path, cls_name):
    """What plain transformers loads without missing, unexpected or mismatched keys: the same names and shapes."""
    torch.manual_seed(0)
    getattr(dinat, cls_name)(DinatConfig(**SMALL)).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    assert saved == LAYOUT["state_dicts"][cls_name]


def test_saved_config_reads_in_transformers_dinat_config(tmp_path):
    from transformers.models.dinat.configuration_dinat import DinatConfig as TransformersDinatConfig

    DinatConfig(**SMALL).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "na_backend" not in written and "use_rpb" not in written  # defaults of options transformers lacks
    theirs = TransformersDinatConfig.from_pretrained(tmp_path).to_dict()
    ours = DinatConfig.from_pretrained(tmp_path).to_dict()
    assert ours.pop("na_backend") == "auto" and ours.pop("use_rpb") is True
    assert theirs == ours


def test_size_mismatch_is_a_value_error_and_a_runtime_error(tmp_path):
    DinatForImageClassification(tiny_config()).save_pretrained(tmp_path)
    # transformers' callers (and its own tests) catch RuntimeError for a size mismatch; this package's, ValueError
    for error in (RuntimeError, ValueError, CheckpointMismatchError):
        with pytest.raises(error, match=r"shape mismatch: classifier\.bias: checkpoint \(3,\) vs model \(7,\)"):
            DinatForImageClassification.from_pretrained(tmp_path, num_labels=7)
    model = DinatForImageClassification.from_pretrained(tmp_path, num_labels=7, ignore_mismatched_sizes=True)
    assert model.classifier.weight.shape == (7, 64)


def test_output_loading_info_reports_missing_keys_instead_of_raising(tmp_path):
    DinatForImageClassification(tiny_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "dinat.encoder.levels.1.layers.0.attention.self.rpb"
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(CheckpointMismatchError, match=rf"missing keys \['{dropped}'\]"):
        DinatForImageClassification.from_pretrained(tmp_path)
    model, info = DinatForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {dropped} or list(info["missing_keys"]) == [dropped]
    assert torch.equal(model.state_dict()["classifier.weight"], weights["classifier.weight"])


def test_backbone_uses_transformers_backbone_api():
    from transformers.backbone_utils import BackboneMixin, BackboneType

    config = tiny_config(out_indices=[0, -1])
    assert config.out_features == ["stem", "stage3"]
    backbone = DinatBackbone(config).eval()
    assert isinstance(backbone, BackboneMixin) and backbone.backbone_type == BackboneType.TRANSFORMERS
    assert backbone.out_feature_channels == {"stem": 16, "stage1": 16, "stage2": 32, "stage3": 64}
    assert backbone.channels == [16, 64]
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        # what UperNet, DPT, ViTMatte ... call; output_attentions reaches the model (DiNAT has attentions)
        out = backbone.forward_with_filtered_kwargs(pixels, output_hidden_states=False, output_attentions=True)
        plain = backbone(pixels)
    assert out.hidden_states is None and len(out.attentions) == 3
    assert [tuple(m.shape) for m in out.feature_maps] == [(1, 16, 8, 8), (1, 64, 2, 2)]
    for a, b in zip(out.feature_maps, plain.feature_maps):
        torch.testing.assert_close(a, b)
    assert backbone(pixels, return_dict=False)[0][1].shape == (1, 64, 2, 2)


def test_config_common_tests():
    """transformers' ConfigTester checks (JSON and save/load round trips, num_labels, common kwargs, init without
    arguments) on DinatConfig: what upstream's stale test_config means to run (see tests/transformers_suite), with
    has_text_modality=False, and embed_dim=48 for upstream's 37, which no DiNAT stage of 2 heads can split
    (this config rejects it when built; transformers' own model when the attention is built)."""
    import unittest

    from transformers_suite.test_configuration_common import ConfigTester

    tester = ConfigTester(unittest.TestCase(), config_class=DinatConfig, has_text_modality=False, embed_dim=48,
                          common_properties=["patch_size", "num_channels"])
    tester.run_common_tests()
    with pytest.raises(ValueError, match=r"num_heads\[0\] = 2 does not divide"):
        DinatConfig(embed_dim=37)
