"""What transformers' own code sees of this package: checkpoints plain transformers reads, error classes its
callers catch, its backbone API. (transformers' own DiNAT test suite runs in tests/transformers_suite/.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dinat import DinatBackbone, DinatConfig, DinatForImageClassification
from dinat.loading import CheckpointMismatchError

SMALL = dict(embed_dim=16, depths=[1, 2, 1], num_heads=[1, 2, 4], kernel_size=3, dilations=[[2], [1, 2], [1]],
             num_labels=3, layer_scale_init_value=0.1, drop_path_rate=0.0)


@pytest.fixture
def plain_transformers(monkeypatch):
    """transformers' own DiNAT module. Its classes refuse to be built without NATTEN; building the module tree
    (all that loading a checkpoint needs) does not use NATTEN, so the check is lifted for these tests."""
    from transformers.models.dinat import modeling_dinat

    monkeypatch.setattr(modeling_dinat, "requires_backends", lambda *args, **kwargs: None)
    return modeling_dinat


@pytest.mark.parametrize("cls_name, extra", [("DinatForImageClassification", {}),
                                             ("DinatBackbone", {"out_features": ["stem", "stage2", "stage3"]})])
def test_saved_checkpoint_loads_in_plain_transformers(tmp_path, plain_transformers, cls_name, extra):
    from transformers.models.dinat.configuration_dinat import DinatConfig as TransformersDinatConfig

    torch.manual_seed(0)
    ours = {"DinatForImageClassification": DinatForImageClassification, "DinatBackbone": DinatBackbone}[cls_name]
    model = ours(DinatConfig(**SMALL, **extra))
    model.save_pretrained(tmp_path)

    written = json.loads((tmp_path / "config.json").read_text())
    assert "na_backend" not in written and "use_rpb" not in written  # defaults of options transformers lacks

    theirs_config = TransformersDinatConfig.from_pretrained(tmp_path).to_dict()
    ours_config = DinatConfig.from_pretrained(tmp_path).to_dict()
    assert ours_config.pop("na_backend") == "auto" and ours_config.pop("use_rpb") is True
    assert theirs_config == ours_config

    theirs, info = getattr(plain_transformers, cls_name).from_pretrained(tmp_path, output_loading_info=True)
    assert type(theirs).__module__ == "transformers.models.dinat.modeling_dinat"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected, got = model.state_dict(), theirs.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_dinat_only_options_are_written_when_set(tmp_path):
    DinatConfig(**SMALL, na_backend="torch", use_rpb=False).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["na_backend"] == "torch" and written["use_rpb"] is False
    loaded = DinatConfig.from_pretrained(tmp_path)
    assert loaded.na_backend == "torch" and loaded.use_rpb is False


def test_size_mismatch_is_a_value_error_and_a_runtime_error(tmp_path):
    DinatForImageClassification(DinatConfig(**SMALL)).save_pretrained(tmp_path)
    # transformers' callers (and its own tests) catch RuntimeError for a size mismatch; this package's, ValueError
    for error in (RuntimeError, ValueError, CheckpointMismatchError):
        with pytest.raises(error, match=r"shape mismatch: classifier\.bias: checkpoint \(3,\) vs model \(7,\)"):
            DinatForImageClassification.from_pretrained(tmp_path, num_labels=7)
    model = DinatForImageClassification.from_pretrained(tmp_path, num_labels=7, ignore_mismatched_sizes=True)
    assert model.classifier.weight.shape == (7, 64)


def test_output_loading_info_reports_missing_keys_instead_of_raising(tmp_path):
    DinatForImageClassification(DinatConfig(**SMALL)).save_pretrained(tmp_path)
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

    config = DinatConfig(**SMALL, out_indices=[0, -1])
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
