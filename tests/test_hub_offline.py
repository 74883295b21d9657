"""Hub ids resolve through a real huggingface_hub cache on disk with HF_HUB_OFFLINE=1 (no mocks), and a
missing or mistyped id fails with one clear sentence. Each check runs in a fresh interpreter because
huggingface_hub reads its environment variables at import time."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hub_cache_helpers import (FIXTURES, REPO_ID, build_hub_cache, offline_env, run_python,
                               small_dinat_config_dict, small_dinat_state_dict)

IMAGE = FIXTURES / "processor" / "images" / "gradient_640x480.png"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    snapshot = build_hub_cache(root / "hub")
    return {"cache": root / "hub", "home": root / "home", "snapshot": snapshot}


def test_cache_layout_is_the_hub_layout(hub):
    repo = hub["cache"] / ("models--" + REPO_ID.replace("/", "--"))
    revision = (repo / "refs" / "main").read_text()
    assert hub["snapshot"] == repo / "snapshots" / revision
    for name in ("config.json", "pytorch_model.bin", "preprocessor_config.json"):
        link = hub["snapshot"] / name
        assert link.is_symlink() and link.resolve().parent == repo / "blobs"
    assert len(json.loads((hub["snapshot"] / "config.json").read_text())["id2label"]) == 1000


def test_model_and_processor_load_from_hub_id_offline(hub):
    code = f"""
import json, torch, dinat
from huggingface_hub import constants
model = dinat.DinatForImageClassification.from_pretrained({REPO_ID!r}).eval()
processor = dinat.DinatImageProcessor.from_pretrained({REPO_ID!r})
pixel_values = processor({str(IMAGE)!r}, return_tensors="pt")["pixel_values"]
with torch.no_grad():
    logits = model(pixel_values).logits
print(json.dumps({{"offline": constants.HF_HUB_OFFLINE, "num_labels": model.config.num_labels,
                  "label_0": model.config.id2label[0], "label_999": model.config.id2label[999],
                  "processor": processor.to_dict(), "pixel_values": pixel_values.flatten()[:1000].tolist(),
                  "logits": logits[0].tolist()}}))
"""
    result = run_python(code, offline_env(hub["cache"], hub["home"]))
    assert result["offline"] is True
    assert result["num_labels"] == 1000
    assert result["label_0"] == "tench, Tinca tinca"
    assert result["label_999"] == "toilet tissue, toilet paper, bathroom tissue"
    assert result["processor"]["size"] == {"height": 224, "width": 224} and result["processor"]["resample"] == 3

    # independent of the hub path: golden pixel values (transformers' ViT processor) through the same weights
    golden = load_file(str(FIXTURES / "processor" / "vit_legacy_bicubic_224" / "pixel_values.safetensors"))
    pixel_values = golden[IMAGE.stem]
    torch.testing.assert_close(torch.tensor(result["pixel_values"]), pixel_values.flatten()[:1000],
                               atol=1e-4, rtol=0)
    from dinat import DinatConfig, DinatForImageClassification

    reference = DinatForImageClassification(DinatConfig(**small_dinat_config_dict())).eval()
    reference.load_state_dict(small_dinat_state_dict())
    with torch.no_grad():
        expected = reference(pixel_values).logits[0]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-4, rtol=1e-4)


ERRORS_CODE = """
import json, dinat
out = {}
for name in NAMES:
    for kind, cls in (("model", dinat.DinatForImageClassification), ("processor", dinat.DinatImageProcessor)):
        try:
            cls.from_pretrained(name)
            out[name + " " + kind] = "loaded"
        except Exception as err:
            out[name + " " + kind] = [type(err).__name__, isinstance(err, OSError), str(err)]
print(json.dumps(out))
"""


def test_offline_without_cached_copy_says_what_and_how(tmp_path):
    empty_cache = tmp_path / "empty-hub"
    empty_cache.mkdir()
    code = ERRORS_CODE.replace("NAMES", repr([REPO_ID]))
    result = run_python(code, offline_env(empty_cache, tmp_path / "home"))
    for kind in ("model", "processor"):
        name, is_os_error, message = result[f"{REPO_ID} {kind}"]
        assert name == "CheckpointNotFoundError" and is_os_error
        assert REPO_ID in message and str(empty_cache) in message and "HF_HUB_OFFLINE=1" in message
        assert "hf download" in message and "HF_HUB_CACHE" in message
        assert "\n" not in message


def test_mistyped_id_and_missing_folder(hub, tmp_path):
    typo = REPO_ID[:-1]  # shi-labs/dinat-mini-in1k-22
    missing_folder = str(tmp_path / "no-such-checkpoint")
    code = ERRORS_CODE.replace("NAMES", repr([typo, missing_folder]))
    result = run_python(code, offline_env(hub["cache"], hub["home"]))
    for kind in ("model", "processor"):
        name, _, message = result[f"{typo} {kind}"]
        assert name == "CheckpointNotFoundError"
        assert f"'{typo}'" in message and "spelling" in message
        name, _, message = result[f"{missing_folder} {kind}"]
        assert name == "CheckpointNotFoundError"
        assert missing_folder in message and "no such folder" in message
