"""`dinat convert`: original SHI-Labs (timm-named) checkpoints -> from_pretrained folders.

The original-layout state dicts are built here from a model, with the mapping written out independently
(one line per fact of the original code), so a converted model must reproduce the model it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinat import PRESETS, DinatConfig, DinatForImageClassification
from dinat import convert as convert_module
from dinat.cli import main as cli_main

TINY = dict(embed_dim=16, depths=[2, 1], num_heads=[2, 4], kernel_size=3, dilations=[[1, 2], [1]],
            mlp_ratio=2.0, num_labels=7)


def to_original_layout(model: DinatForImageClassification) -> dict[str, torch.Tensor]:
    """The state dict the original DiNAT code would hold for these weights."""
    ours = model.state_dict()
    original = {
        "patch_embed.proj.0.weight": ours["dinat.embeddings.patch_embeddings.projection.0.weight"],
        "patch_embed.proj.0.bias": ours["dinat.embeddings.patch_embeddings.projection.0.bias"],
        "patch_embed.proj.1.weight": ours["dinat.embeddings.patch_embeddings.projection.1.weight"],
        "patch_embed.proj.1.bias": ours["dinat.embeddings.patch_embeddings.projection.1.bias"],
        "patch_embed.norm.weight": ours["dinat.embeddings.norm.weight"],
        "patch_embed.norm.bias": ours["dinat.embeddings.norm.bias"],
        "norm.weight": ours["dinat.layernorm.weight"],
        "norm.bias": ours["dinat.layernorm.bias"],
        "head.weight": ours["classifier.weight"],
        "head.bias": ours["classifier.bias"],
    }
    config = model.config
    for i, depth in enumerate(config.depths):
        for j in range(depth):
            src, dst = f"dinat.encoder.levels.{i}.layers.{j}.", f"levels.{i}.blocks.{j}."
            for suffix in ("weight", "bias"):
                original[dst + f"norm1.{suffix}"] = ours[src + f"layernorm_before.{suffix}"]
                original[dst + f"norm2.{suffix}"] = ours[src + f"layernorm_after.{suffix}"]
                original[dst + f"attn.qkv.{suffix}"] = torch.cat(
                    [ours[src + f"attention.self.{name}.{suffix}"] for name in ("query", "key", "value")])
                original[dst + f"attn.proj.{suffix}"] = ours[src + f"attention.output.dense.{suffix}"]
                original[dst + f"mlp.fc1.{suffix}"] = ours[src + f"intermediate.dense.{suffix}"]
                original[dst + f"mlp.fc2.{suffix}"] = ours[src + f"output.dense.{suffix}"]
            original[dst + "attn.rpb"] = ours[src + "attention.self.rpb"]
            if config.layer_scale_init_value > 0:
                original[dst + "gamma1"] = ours[src + "layer_scale_parameters"][0]
                original[dst + "gamma2"] = ours[src + "layer_scale_parameters"][1]
        if i < len(config.depths) - 1:
            src, dst = f"dinat.encoder.levels.{i}.downsample.", f"levels.{i}.downsample."
            original[dst + "reduction.weight"] = ours[src + "reduction.weight"]
            original[dst + "norm.weight"] = ours[src + "norm.weight"]
            original[dst + "norm.bias"] = ours[src + "norm.bias"]
    return {key: value.clone() for key, value in original.items()}


def randomized(config: DinatConfig, seed: int = 0) -> DinatForImageClassification:
    """A model whose every parameter (layer scales and rpb included) is random, so no mix-up goes unseen."""
    torch.manual_seed(seed)
    model = DinatForImageClassification(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return model


def assert_reproduces(source: DinatForImageClassification, output_dir: Path, size: tuple[int, int]) -> None:
    converted = DinatForImageClassification.from_pretrained(output_dir).eval()
    expected, got = source.state_dict(), converted.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(converted(pixels).logits, source(pixels).logits, rtol=1e-5, atol=1e-5)


def test_mini_variant_detected_and_reproduced(tmp_path, capsys):
    source = randomized(DinatConfig.from_preset("mini", num_labels=5))
    checkpoint = tmp_path / "dinat_mini_in1k_224.pth"
    torch.save({"model": to_original_layout(source), "epoch": 3}, checkpoint)
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out")]) == 0
    assert "input 224x224, bicubic resize, crop 0.875" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["dilations"] == PRESETS["mini"]["dilations"]
    assert saved["depths"] == [3, 4, 6, 5] and saved["kernel_size"] == 7
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 224, "width": 224} and processor["crop_pct"] == 0.875
    assert processor["resample"] == 3 and processor["image_mean"] == [0.485, 0.456, 0.406]
    assert_reproduces(source, tmp_path / "out", (64, 64))


def test_custom_config_with_layer_scale_under_state_dict(tmp_path, capsys):
    config = DinatConfig(**TINY, layer_scale_init_value=1e-5)
    source = randomized(config, seed=3)
    checkpoint = tmp_path / "custom.pth"
    torch.save({"state_dict": to_original_layout(source)}, checkpoint)
    config_path = tmp_path / "config.json"
    config.to_json_file(str(config_path))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(7)) + "\n")
    code = cli_main(["convert", str(checkpoint), str(tmp_path / "out"), "--config", str(config_path),
                     "--labels", str(labels), "--image-size", "40"])
    assert code == 0, capsys.readouterr().err
    assert_reproduces(source, tmp_path / "out", (40, 40))
    reloaded = DinatConfig.from_pretrained(tmp_path / "out")
    assert reloaded.id2label[6] == "class6"


@pytest.mark.parametrize("name", list(PRESETS))
def test_variant_from_shapes(name):
    with torch.device("meta"):  # shapes only: the large variants would take gigabytes
        model = DinatForImageClassification(DinatConfig.from_preset(name, num_labels=1000))
    original = to_original_layout(model)
    matches = convert_module.matching_variants(convert_module.architecture_from_shapes(original))
    assert name in matches
    config, chosen = convert_module.infer_config(original, variant=name)
    assert chosen == name and config.dilations == PRESETS[name]["dilations"]
    assert config.num_labels == 1000
    if len(matches) == 1:  # the shapes alone name it
        assert convert_module.infer_config(original)[1] == name


def test_variants_of_the_same_shapes_need_the_original_file_name_or_variant():
    with torch.device("meta"):
        original = to_original_layout(DinatForImageClassification(DinatConfig.from_preset("large", num_labels=3)))
    # a name that is not one of the registered original checkpoints' is no hint, whatever it contains
    for name in ("weights.pth", "my_large_384.pth"):
        with pytest.raises(ValueError, match="--variant"):
            convert_module.infer_config(original, file_name=name)
    config, chosen = convert_module.infer_config(original, file_name="dinat_large_in22k_in1k_384.pth")
    assert chosen == "large-384" and config.dilations[0] == [1, 13, 1]
    assert convert_module.infer_config(original, file_name="dinat_large_in22k_in1k_224.pth")[1] == "large"
    with pytest.raises(ValueError, match="not those of variant 'mini'"):
        convert_module.infer_config(original, variant="mini")
    # NAT checkpoints have DiNAT's shapes; the original file names tell them apart
    with torch.device("meta"):
        mini = to_original_layout(DinatForImageClassification(DinatConfig.from_preset("mini", num_labels=3)))
    assert convert_module.infer_config(mini, file_name="nat_mini.pth")[0].dilations == [[1] * 3, [1] * 4, [1] * 6,
                                                                                         [1] * 5]


def test_processor_written_from_the_registry():
    # the 384 fine-tunes are evaluated uncropped at 384, the 224 models at crop 0.875 (the original validate.py);
    # the configs carry no name, so this can only come from the architecture's registry entry
    for name, size, crop in (("large-384", 384, 1.0), ("large-11x11-384", 384, 1.0), ("large", 224, 0.875)):
        config = DinatConfig.from_preset(name)
        processor = convert_module.image_processor(config)
        assert processor.input_size == (size, size) and processor.crop_pct == crop, name
        assert processor.resample == 3  # PIL's BICUBIC
    custom = convert_module.image_processor(DinatConfig(**TINY), image_size=40)
    assert custom.input_size == (40, 40) and custom.crop_pct == 0.875


def _tiny_checkpoint(tmp_path: Path, edit) -> Path:
    original = to_original_layout(randomized(DinatConfig(**TINY)))
    edit(original)
    path = tmp_path / "edited.pth"
    torch.save(original, path)
    (tmp_path / "config.json").write_text(DinatConfig(**TINY).to_json_string())
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update({"levels.0.blocks.0.attn.relative_position_index": torch.zeros(3)}),
     "unknown keys (1): levels.0.blocks.0.attn.relative_position_index"),
    (lambda sd: sd.pop("levels.1.blocks.0.mlp.fc2.bias"), "missing keys (1): dinat.encoder.levels.1.layers.0.output"),
    (lambda sd: sd.update({"levels.0.blocks.1.gamma1": torch.ones(16)}),
     "gamma1 but not its partner"),
])
def test_refused_and_nothing_written(tmp_path, capsys, edit, message):
    checkpoint = _tiny_checkpoint(tmp_path, edit)
    out = tmp_path / "out"
    code = cli_main(["convert", str(checkpoint), str(out), "--config", str(tmp_path / "config.json")])
    assert code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # stderr also has the progress bar
    assert len(errors) == 1 and errors[0].startswith("dinat convert: error: ") and message in errors[0]
    assert not out.exists()
    # nothing left but the (empty) lock file that serializes writers of "out"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] in ([], [".out.dinat-lock"])  # no staging folder left


def test_unknown_variant_shapes_refused(tmp_path, capsys):
    checkpoint = _tiny_checkpoint(tmp_path, lambda sd: None)
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out")]) == 1
    assert "match no DiNAT variant" in capsys.readouterr().err


def test_interrupted_write_leaves_no_loadable_folder(tmp_path, monkeypatch):
    checkpoint = _tiny_checkpoint(tmp_path, lambda sd: None)
    config = DinatConfig(**TINY)

    def interrupted(self, *args, **kwargs):
        Path(args[0], "config.json").write_text(config.to_json_string())  # some files written, then it dies
        raise KeyboardInterrupt

    monkeypatch.setattr(DinatForImageClassification, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert_checkpoint(checkpoint, tmp_path / "out", config=config, progress=False)
    assert not (tmp_path / "out").exists()
    # nothing left but the (empty) lock file that serializes writers of "out"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] in ([], [".out.dinat-lock"])


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    checkpoint = _tiny_checkpoint(tmp_path, lambda sd: None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["convert", str(checkpoint), str(out), "--config", str(tmp_path / "config.json")]
    assert cli_main(args) == 1
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert cli_main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    assert cli_main(["convert", str(bad), str(tmp_path / "out")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "absent.pth"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_training_checkpoint_with_options_and_ddp_prefix(tmp_path):
    import argparse

    source = randomized(DinatConfig(**TINY), seed=5)
    state = {f"module.{key}": value for key, value in to_original_layout(source).items()}
    checkpoint = tmp_path / "checkpoint-best.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-3, model="custom"), "epoch": 9}, checkpoint)
    convert_module.convert_checkpoint(checkpoint, tmp_path / "out", config=DinatConfig(**TINY), progress=False)
    assert_reproduces(source, tmp_path / "out", (32, 32))
