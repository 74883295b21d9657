"""`import dinat` makes transformers' Auto classes and `pipeline` build this package's DiNAT: checked against the
reference outputs of the golden cases, and end to end with a hub id resolved offline from a real cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel,
                          AutoModelForImageClassification)

import dinat
from conftest import CASES, REFERENCE_TOL, case_io
from hub_cache_helpers import (FIXTURES, REPO_ID, build_hub_cache, offline_env, run_python,
                               small_dinat_config_dict, small_dinat_state_dict)

CASE = CASES / "tiny_pad"


@pytest.fixture(scope="module")
def io():
    return case_io("tiny_pad")


def test_auto_config_is_ours():
    assert type(AutoConfig.for_model("dinat")) is dinat.DinatConfig
    assert type(AutoConfig.from_pretrained(CASE / "model")) is dinat.DinatConfig
    assert type(AutoModelForImageClassification.from_config(dinat.DinatConfig(num_labels=3))) \
        is dinat.DinatForImageClassification


def test_auto_models_are_ours_and_match_reference(io):
    classifier = AutoModelForImageClassification.from_pretrained(CASE / "model").eval()
    assert type(classifier) is dinat.DinatForImageClassification
    base = AutoModel.from_pretrained(CASE / "model").eval()
    assert type(base) is dinat.DinatModel
    # transformers 5.24's AutoBackbone.from_pretrained first asks the hub whether the id exists (failing for local
    # folders and offline), so the backbone is built through AutoBackbone.from_config and given the weights
    backbone_config = AutoConfig.from_pretrained(CASE / "backbone")
    backbone = AutoBackbone.from_config(backbone_config)
    assert type(backbone) is dinat.DinatBackbone
    backbone.load_state_dict(dinat.DinatBackbone.from_pretrained(CASE / "backbone").state_dict())
    backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(classifier(io["pixel_values"]).logits, io["logits"], **REFERENCE_TOL)
        torch.testing.assert_close(base(io["pixel_values"]).pooler_output, io["pooler_output"], **REFERENCE_TOL)
        maps = backbone(io["pixel_values"]).feature_maps
    assert len(maps) == len([k for k in io if k.startswith("backbone.feature_maps.")])
    for i, feature_map in enumerate(maps):
        torch.testing.assert_close(feature_map, io[f"backbone.feature_maps.{i}"], **REFERENCE_TOL)


def test_auto_image_processor(tmp_path):
    # a config naming our processor, and one naming none (resolved through config.json's model_type "dinat")
    saved = tmp_path / "saved"
    dinat.DinatImageProcessor(size=224, resample=3).save_pretrained(saved)
    assert type(AutoImageProcessor.from_pretrained(saved)) is dinat.DinatImageProcessor

    untyped = tmp_path / "untyped"
    untyped.mkdir()
    (untyped / "config.json").write_text((CASE / "model" / "config.json").read_text())
    (untyped / "preprocessor_config.json").write_text(json.dumps({"size": 96, "resample": 2}))
    processor = AutoImageProcessor.from_pretrained(untyped)
    assert type(processor) is dinat.DinatImageProcessor and processor.input_size == (96, 96)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    build_hub_cache(root / "hub")
    return {"cache": root / "hub", "home": root / "home"}


def test_pipeline_with_hub_id_offline(hub):
    image = FIXTURES / "processor" / "images" / "noise_tall_200x300.png"
    code = f"""
import json, dinat
from transformers import pipeline
classify = pipeline("image-classification", model={REPO_ID!r})
print(json.dumps({{"model_class": type(classify.model).__module__ + "." + type(classify.model).__name__,
                  "results": classify({str(image)!r}, top_k=5)}}))
"""
    result = run_python(code, offline_env(hub["cache"], hub["home"]))
    assert result["model_class"] == "dinat.modeling_dinat.DinatForImageClassification"

    # expected: the same weights on the golden pixel values (transformers 4.46.3's ViT processor)
    pixel_values = load_file(str(FIXTURES / "processor" / "vit_legacy_bicubic_224" / "pixel_values.safetensors"))
    config = small_dinat_config_dict()
    reference = dinat.DinatForImageClassification(dinat.DinatConfig(**config)).eval()
    reference.load_state_dict(small_dinat_state_dict())
    with torch.no_grad():
        probs = reference(pixel_values[image.stem]).logits.softmax(-1)[0]
    scores, indices = probs.topk(5)
    expected_labels = [config["id2label"][str(i)] for i in indices.tolist()]
    assert [r["label"] for r in result["results"]] == expected_labels
    torch.testing.assert_close(torch.tensor([r["score"] for r in result["results"]]), scores, atol=1e-5, rtol=1e-4)


def test_pipeline_uses_our_processor_when_the_config_names_it(tmp_path):
    from transformers import pipeline

    config = small_dinat_config_dict()
    model = dinat.DinatForImageClassification(dinat.DinatConfig(**config)).eval()
    model.load_state_dict(small_dinat_state_dict())
    model.save_pretrained(tmp_path)
    dinat.DinatImageProcessor(size=224, resample=3).save_pretrained(tmp_path)  # the hub checkpoints' settings

    classify = pipeline("image-classification", model=str(tmp_path))
    assert type(classify.image_processor) is dinat.DinatImageProcessor
    assert type(classify.model) is dinat.DinatForImageClassification
    image = FIXTURES / "processor" / "images" / "gradient_640x480.png"
    results = classify(str(image), top_k=3)

    pixel_values = load_file(str(FIXTURES / "processor" / "vit_legacy_bicubic_224" / "pixel_values.safetensors"))
    with torch.no_grad():
        scores, indices = model(pixel_values[image.stem]).logits.softmax(-1)[0].topk(3)
    assert [r["label"] for r in results] == [config["id2label"][str(i)] for i in indices.tolist()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in results]), scores, atol=1e-5, rtol=1e-4)
