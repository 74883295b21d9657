"""DinatConfig: transformers-compatible fields and files, validation, and the paper's presets."""

import json

import pytest
import torch
from transformers.models.dinat import DinatConfig as TransformersDinatConfig

from conftest import CASES
from dinat import DinatConfig, DinatForImageClassification
from dinat.registry import VARIANTS, get_variant, variant_for_config, variant_for_original_file

FIELDS = ["patch_size", "num_channels", "embed_dim", "depths", "num_heads", "kernel_size", "dilations",
          "mlp_ratio", "qkv_bias", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate",
          "hidden_act", "initializer_range", "layer_norm_eps", "layer_scale_init_value", "out_features",
          "out_indices", "num_labels", "problem_type", "hidden_size", "num_layers", "stage_names"]


def test_defaults_match_transformers_dinat_config():
    ours, theirs = DinatConfig(), TransformersDinatConfig()
    assert ours.model_type == "dinat"
    for name in FIELDS:
        assert list_like(getattr(ours, name)) == list_like(getattr(theirs, name)), name


def list_like(value):
    return [list_like(v) for v in value] if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("case", ["tiny_pad/model", "odd_shapes/model", "tiny_pad/backbone", "mini_layout/model"])
def test_reads_hub_config_and_writes_one_transformers_reads(case, tmp_path):
    raw = json.loads((CASES / case / "config.json").read_text())
    config = DinatConfig.from_pretrained(CASES / case)
    for name in ("depths", "num_heads", "dilations", "kernel_size", "embed_dim", "mlp_ratio",
                 "layer_scale_init_value", "out_features", "out_indices"):
        assert getattr(config, name) == raw[name], name
    assert config.num_labels == len(raw["id2label"])
    config.save_pretrained(tmp_path)
    theirs = TransformersDinatConfig.from_pretrained(tmp_path)
    for name in FIELDS:
        assert list_like(getattr(theirs, name)) == list_like(getattr(config, name)), name
    assert DinatConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_unknown_keys_are_tolerated(tmp_path):
    raw = json.loads((CASES / "tiny_pad/model/config.json").read_text())
    raw["path_norm"] = True  # found in some hub configs
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert DinatConfig.from_pretrained(tmp_path).depths == raw["depths"]


@pytest.mark.parametrize("overrides, field", [
    (dict(depths=[2, 2], num_heads=[2, 4, 8]), "num_heads"),
    (dict(depths=[2, 2], num_heads=[2, 4], dilations=[[1, 1]]), "dilations"),
    (dict(depths=[2, 2], num_heads=[2, 4], dilations=[[1, 1], [1]]), r"dilations\[1\]"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(dilations=[[1, 0, 1], [1] * 4, [1] * 6, [1] * 5]), r"dilations\[0\]\[1\]"),
    (dict(embed_dim=60, num_heads=[8, 4, 8, 16]), r"num_heads\[0\]"),
    (dict(patch_size=2), "every released DiNAT checkpoint uses 4"),
    (dict(embed_dim=0), "embed_dim"),
    (dict(num_channels=-1), "num_channels"),
    (dict(depths=[3, 0, 6, 5]), r"depths\[1\]"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(out_features=["stage9"]), "out_features"),
])
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        DinatConfig(**overrides)


def test_bad_config_file_names_the_file(tmp_path):
    raw = json.loads((CASES / "tiny_pad/model/config.json").read_text())
    raw["kernel_size"] = 4
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"{tmp_path}.*kernel_size"):
        DinatConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="config.json"):
        DinatConfig.from_pretrained(tmp_path)


# parameter counts with a 1000-class head, from the paper (Table 1/2): 20M, 28M, 51M, 90M, 200M
PAPER_PARAMS = {"mini": 20e6, "tiny": 28e6, "small": 51e6, "base": 90e6, "large": 200e6}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_preset_parameter_counts_match_the_paper(name):
    config = DinatConfig.from_preset(name, num_labels=1000)
    with torch.device("meta"):
        model = DinatForImageClassification(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03, count


def test_presets_hold_the_papers_settings():
    large384 = DinatConfig.from_preset("large-384")
    assert large384.dilations[0] == [1, 13, 1] and large384.dilations[2] == [1, 3] * 9
    k11 = DinatConfig.from_preset("large-11x11-384")
    assert k11.kernel_size == 11 and k11.dilations[0] == [1, 8, 1]
    assert DinatConfig.from_preset("base").layer_scale_init_value == 1e-5
    for name in PAPER_PARAMS:
        config = DinatConfig.from_preset(name)
        assert config.patch_size == 4 and config.qkv_bias
        assert all(config.embed_dim * 2 ** i // h == 32 for i, h in enumerate(config.num_heads))  # head dim 32
    with pytest.raises(ValueError, match="unknown DiNAT preset"):
        DinatConfig.from_preset("huge")


# -------------------------------------------------------------------------------------------------
# The variant registry
# -------------------------------------------------------------------------------------------------
ARCHITECTURE = ("depths", "num_heads", "dilations", "kernel_size", "mlp_ratio", "layer_scale_init_value")


def test_mini_matches_the_hub_checkpoints_metadata():
    # two independent records of shi-labs/dinat-mini-in1k-224: transformers' DinatConfig defaults describe it,
    # and the mini_layout fixture was saved from the reference with its depths, heads and dilations
    mini = DinatConfig.from_preset("mini")
    theirs = TransformersDinatConfig()
    fixture = json.loads((CASES / "mini_layout" / "model" / "config.json").read_text())
    for name in ARCHITECTURE:
        assert list_like(getattr(mini, name)) == list_like(getattr(theirs, name)), name
        assert list_like(getattr(mini, name)) == fixture[name], name
    assert mini.embed_dim == theirs.embed_dim


def test_pretrained_metadata_matches_the_hub_processor_files():
    # the 224 checkpoints' preprocessor_config.json (legacy ViTFeatureExtractor form): 224, bicubic, ImageNet
    hub = json.loads((CASES.parent / "processor" / "vit_legacy_bicubic_224" / "preprocessor_config.json").read_text())
    for variant in VARIANTS.values():
        data = variant.pretrained
        assert list(data.mean) == hub["image_mean"] and list(data.std) == hub["image_std"]
        assert data.interpolation == "bicubic" and hub["resample"] == 3  # PIL's BICUBIC
        assert data.num_classes == 1000
        assert data.input_size == ((384, 384) if variant.name.endswith("384") else (hub["size"], hub["size"]))


def test_registry_names_are_unique_and_resolve():
    hub_ids = [v.pretrained.hub_id for v in VARIANTS.values()]
    files = [v.pretrained.original_file for v in VARIANTS.values()]
    assert len(set(hub_ids)) == len(hub_ids) and len(set(files)) == len(files)
    assert "shi-labs/dinat-large-11x11-in22k-in1k-384" in hub_ids and "shi-labs/nat-mini-in1k-224" in hub_ids
    for name, variant in VARIANTS.items():
        assert get_variant(variant.pretrained.hub_id) is variant
        assert variant_for_original_file(variant.pretrained.original_file) is variant
        # the dilations tell apart variants whose shapes agree (large / large-384, mini / nat-mini)
        assert variant_for_config(DinatConfig.from_preset(name)) is variant
        assert DinatConfig.from_preset(variant.pretrained.hub_id).to_dict() == DinatConfig.from_preset(name).to_dict()
    assert variant_for_config(DinatConfig(embed_dim=32)) is None


def test_nat_variants_load_as_dinat_without_dilation():
    # a NAT hub config (transformers' model_type "nat") is the registry's NAT variant of the same size
    nat = {key: value for key, value in DinatConfig.from_preset("nat-small").to_dict().items() if key != "dilations"}
    config = DinatConfig.from_dict(dict(nat, model_type="nat"))
    assert variant_for_config(config).name == "nat-small"
    assert config.layer_scale_init_value == 1e-5  # NAT-small has layer scale, DiNAT-small has none


def test_from_preset_returns_independent_configs():
    first = DinatConfig.from_preset("tiny")
    first.dilations[2][1] = 99
    assert DinatConfig.from_preset("tiny").dilations[2][1] == 2
    assert VARIANTS["tiny"].architecture["dilations"][2][1] == 2
