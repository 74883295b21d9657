"""The `dinat predict` and `dinat info` commands: labels against the reference model on golden pixel values,
the pipeline against the processor and model called directly, variant summaries against the paper's published
sizes and the registry, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dinat
from dinat.cli import main
from dinat.inference import checkpoint_processor, classify, default_processor, load_classifier
from hub_cache_helpers import (FIXTURES, REPO_ID, build_hub_cache, offline_env, small_dinat_config_dict,
                               small_dinat_state_dict)

IMAGES = FIXTURES / "processor" / "images"
NAMES = ["gradient_640x480", "gray_150x100", "noise_tall_200x300"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    snapshot = build_hub_cache(root / "hub")
    return {"cache": root / "hub", "home": root / "home", "snapshot": snapshot}


@pytest.fixture(scope="module")
def expected_probs():
    """Softmax of the checkpoint's weights on the golden pixel values (transformers' ViT processor)."""
    pixel_values = load_file(str(FIXTURES / "processor" / "vit_legacy_bicubic_224" / "pixel_values.safetensors"))
    model = dinat.DinatForImageClassification(dinat.DinatConfig(**small_dinat_config_dict())).eval()
    model.load_state_dict(small_dinat_state_dict())
    with torch.no_grad():
        return {name: model(pixel_values[name]).logits.softmax(-1)[0] for name in NAMES}


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinat.cli", *args], env=env, capture_output=True, text=True,
                          timeout=240)


def test_predict_json_matches_reference(hub, expected_probs, capsys):
    images = [str(IMAGES / f"{n}.png") for n in NAMES]
    code = main(["predict", *images, "--model", str(hub["snapshot"]), "--top-k", "3", "--batch-size", "2",
                 "--json"])
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    labels = small_dinat_config_dict()["id2label"]
    assert [r["image"] for r in document["results"]] == images
    for name, result in zip(NAMES, document["results"]):
        scores, indices = expected_probs[name].topk(3)
        assert [p["label"] for p in result["predictions"]] == [labels[str(i)] for i in indices.tolist()]
        torch.testing.assert_close(torch.tensor([p["score"] for p in result["predictions"]]), scores,
                                   atol=1e-5, rtol=1e-4)


def test_predict_text_and_bfloat16(hub, expected_probs, capsys):
    images = [str(IMAGES / f"{n}.png") for n in NAMES[1:]]  # clear winners, so bfloat16 keeps the top label
    assert main(["predict", *images, "--model", str(hub["snapshot"]), "-k", "2", "--dtype", "bfloat16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 3 and lines[0] == images[0] and lines[3] == images[1]
    labels = small_dinat_config_dict()["id2label"]
    for name, block in zip(NAMES[1:], (lines[0:3], lines[3:6])):
        top_score, top_index = expected_probs[name].max(0)
        score_text, label = block[1].strip().split("  ", 1)
        assert label == labels[str(top_index.item())]
        assert abs(float(score_text) - top_score.item()) < 0.02


def test_predict_with_hub_id_offline_via_console_script(hub, expected_probs):
    env = offline_env(hub["cache"], hub["home"])
    proc = run_cli(["predict", str(IMAGES / "gray_150x100.png"), "--model", REPO_ID, "--top-k", "1", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    prediction = json.loads(proc.stdout)["results"][0]["predictions"][0]
    labels = small_dinat_config_dict()["id2label"]
    assert prediction["label"] == labels[str(expected_probs["gray_150x100"].argmax().item())]


@pytest.mark.parametrize("preset, params_m, gflops", [
    ("mini", 20, 2.7), ("tiny", 28, 4.3), ("small", 51, 7.8), ("base", 90, 13.7)])
def test_info_matches_the_papers_sizes(preset, params_m, gflops, capsys):
    # DiNAT paper (arXiv 2209.15001), ImageNet-1K table: parameters (M) and GFLOPs at 224x224
    assert main(["info", preset, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert round(summary["parameters"] / 1e6) == params_m
    assert summary["gflops"] == pytest.approx(gflops, abs=0.06)
    assert summary["input_size"] == [224, 224]
    config = dinat.DinatConfig.from_preset(preset)
    assert summary["depths"] == config.depths and summary["dilations"] == config.dilations


def test_info_on_checkpoint_uses_processor_size(hub, tmp_path, capsys):
    assert main(["info", str(hub["snapshot"])]) == 0
    text = capsys.readouterr().out
    assert "stage1 [4]" in text and "labels:      1000" in text and "at 3x224x224" in text
    expected_params = sum(p.numel() for p in small_dinat_state_dict().values())
    assert f"{expected_params:,}" in text

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((hub["snapshot"] / "config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 96, "width": 128}}))
    assert main(["info", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_size"] == [96, 128]


def assert_one_line_error(command: str, stderr: str, fragment: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"dinat {command}: error: ") and fragment in lines[0], lines


def test_errors_are_one_line(hub, tmp_path, capsys):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((IMAGES / "noise_224.png").read_bytes()[:5000])
    model, good = str(hub["snapshot"]), str(IMAGES / "noise_224.png")
    cases = [
        (["predict", str(tmp_path / "missing.png"), "--model", model], "no such file"),
        (["predict", good, str(not_image), "--model", model], f"image 2 ('{not_image}'): not an image file"),
        (["predict", good, str(truncated), "--model", model], f"image 2 ('{truncated}'): cannot decode image"),
        (["predict", good, "--model", str(tmp_path / "no-model")], "no such folder"),
        (["predict", good, "--model", model, "--top-k", "0"], "--top-k"),
        (["predict", good, "--model", model, "--device", "warp-drive"], "unknown device"),
        (["info", str(tmp_path / "no-model")], "no such folder"),
    ]
    for args, fragment in cases:
        assert main(args) != 0, args
        assert_one_line_error(args[0], capsys.readouterr().err, fragment)


def test_offline_errors_from_the_console_script(hub):
    env = offline_env(hub["cache"], hub["home"])
    good = str(IMAGES / "noise_224.png")
    for args in (["predict", good, "--model", "shi-labs/dinat-mini-in1k-22"], ["info", "shi-labs/not-cached"]):
        proc = run_cli(args, env)
        assert proc.returncode != 0
        assert_one_line_error(args[0], proc.stderr, "HF_HUB_OFFLINE=1")
        assert args[-1] in proc.stderr

    proc = run_cli(["predict", good, "--model", "tiny"], env)  # a preset name where a checkpoint is needed
    assert_one_line_error("predict", proc.stderr, "is a preset name, not a checkpoint")
    assert "'shi-labs/dinat-tiny-in1k-224'" in proc.stderr

    proc = run_cli(["--debug", "predict", good, "--model", "shi-labs/dinat-mini-in1k-22"], env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CheckpointNotFoundError" in proc.stderr


def test_classify_through_the_pipeline_gives_the_processor_and_model_top5(hub, tmp_path):
    # the path predict took before the pipeline: processor -> model -> softmax -> top-k, here written out
    model = load_classifier(str(hub["snapshot"]))
    processor = checkpoint_processor(str(hub["snapshot"]))
    wide = np.random.default_rng(0).integers(0, 65536, (90, 130), dtype=np.uint16)
    deep = tmp_path / "sixteen_bit.png"
    Image.fromarray(wide).save(deep)  # 16-bit grayscale: PIL's own RGB conversion would clip it
    images = [str(IMAGES / "gradient_640x480.png"), str(IMAGES / "noise_tall_200x300.png"), str(deep)]
    results = classify(model, processor, images, top_k=5, batch_size=2)
    labels = model.config.id2label
    for image, result in zip(images, results):
        with torch.no_grad():
            probs = model(processor(image)["pixel_values"]).logits.softmax(-1)[0]
        scores, indices = probs.topk(5)
        assert result["image"] == image
        assert [p["label"] for p in result["predictions"]] == [labels[i] for i in indices.tolist()]
        torch.testing.assert_close(torch.tensor([p["score"] for p in result["predictions"]]), scores,
                                   atol=1e-6, rtol=1e-5)


def test_info_and_predict_take_a_384_variants_input_from_the_registry(tmp_path, capsys):
    # a folder named without "384", holding DiNAT-large-384's config and no preprocessor_config.json
    folder = tmp_path / "checkpoint"
    dinat.DinatConfig.from_preset("large-384", num_labels=1000).save_pretrained(folder)
    assert main(["info", str(folder), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["variant"] == "large-384" and summary["input_size"] == [384, 384]
    assert summary["crop_pct"] == 1.0 and summary["interpolation"] == "bicubic"
    assert main(["info", "large-11x11-384"]) == 0
    assert "bicubic resize, crop 1" in capsys.readouterr().out
    processor = default_processor(dinat.DinatConfig.from_pretrained(folder))
    assert processor.input_size == (384, 384) and processor.crop_pct == 1.0
