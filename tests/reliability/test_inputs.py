"""Reliability of inputs (issue 10, points 3 and 4): images as people take them, and configs that say what is wrong.

Table-driven: each row is (case, how the input is made, expected error and message, or expected result).
docs/reliability.md ("Inputs") lists the same cases.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CASES, FIXTURES
from dinat import DinatConfig, DinatForImageClassification, DinatImageProcessor
from dinat.config_validation import MAX_PARAMETERS, estimated_parameters

MODEL = CASES / "tiny_pad" / "model"  # a small classification checkpoint (config.json + weights)
VIT_PROCESSOR = FIXTURES / "processor" / "vit_legacy_bicubic_224" / "preprocessor_config.json"  # the hub's form
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


# =================================================================================================
# Configs: every path in raises a ValueError naming the field (and the file or argument)
# =================================================================================================
CONFIG_CASES = [  # (case, DinatConfig keyword arguments, regex the ValueError must match)
    ("unknown activation", dict(hidden_act="swishy"), r"hidden_act .*'swishy'"),
    ("activation not a string", dict(hidden_act=3), r"hidden_act"),
    ("mlp_ratio as a string", dict(mlp_ratio="2"), r"mlp_ratio must be a number"),
    ("mlp_ratio infinite", dict(mlp_ratio=math.inf), r"mlp_ratio must be finite"),
    ("mlp_ratio NaN", dict(mlp_ratio=math.nan), r"mlp_ratio must be finite"),
    ("MLP of width 0", dict(mlp_ratio=0.01), r"mlp_ratio gives an MLP of width .* = 0"),
    ("depths not a list", dict(depths=4), r"depths must be a list"),
    ("depth 0", dict(depths=[3, 0, 6, 5]), r"depths\[1\]"),
    ("depth as a float", dict(depths=[3, 4.0, 6, 5]), r"depths\[1\] must be an integer"),
    ("too many layers", dict(depths=[2000], num_heads=[2], dilations=[[1] * 2000]), r"depths"),
    ("num_heads shorter than depths", dict(depths=[2, 2], num_heads=[2, 4, 8]), r"num_heads has 3 entries"),
    ("dilations: wrong stage count", dict(depths=[2, 2], num_heads=[2, 4], dilations=[[1, 1]]), r"dilations"),
    ("dilations: wrong layer count", dict(depths=[2, 2], num_heads=[2, 4], dilations=[[1, 1], [1]]),
     r"dilations\[1\] has 1 values"),
    ("dilation 0", dict(dilations=[[1, 0, 1], [1] * 4, [1] * 6, [1] * 5]), r"dilations\[0\]\[1\]"),
    ("dilations not lists", dict(dilations=[1, 2, 3, 4]), r"dilations must be a list"),
    ("embed_dim 1", dict(embed_dim=1, num_heads=[1, 1, 1, 1]), r"embed_dim must be >= 2"),
    ("embed_dim not divisible by heads", dict(embed_dim=60, num_heads=[8, 4, 8, 16]), r"num_heads\[0\] = 8"),
    ("embed_dim as a string", dict(embed_dim="64"), r"embed_dim must be an integer"),
    ("kernel_size even", dict(kernel_size=4), r"kernel_size must be odd"),
    ("kernel_size 1", dict(kernel_size=1), r"kernel_size must be >= 3"),
    ("patch_size 2", dict(patch_size=2), r"patch_size must be 4"),
    ("num_channels 0", dict(num_channels=0), r"num_channels"),
    ("initializer_range negative", dict(initializer_range=-1), r"initializer_range must be in \(0"),
    ("layer_norm_eps 0", dict(layer_norm_eps=0.0), r"layer_norm_eps"),
    ("layer_scale negative", dict(layer_scale_init_value=-1e-5), r"layer_scale_init_value"),
    ("drop_path_rate 1", dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0.0, 1.0\)"),
    ("dropout negative", dict(hidden_dropout_prob=-0.1), r"hidden_dropout_prob"),
    ("attention dropout NaN", dict(attention_probs_dropout_prob=math.nan), r"attention_probs_dropout_prob"),
    ("bool as a string", dict(qkv_bias="false"), r"qkv_bias must be True or False"),
    ("use_rpb as a number", dict(use_rpb=1), r"use_rpb must be True or False"),
    ("output_hidden_states as a string", dict(output_hidden_states="yes"), r"output_hidden_states"),
    ("dtype float13", dict(dtype="float13"), r"dtype must be one of"),
    ("torch_dtype float13", dict(torch_dtype="float13"), r"torch_dtype must be one of"),
    ("num_labels -1", dict(num_labels=-1), r"num_labels must be in \[0, 1000000\]"),
    ("num_labels 1e9", dict(num_labels=10 ** 9), r"num_labels must be in \[0, 1000000\]"),
    ("num_labels a float", dict(num_labels=1e3), r"num_labels must be an integer"),
    ("id2label with a gap", dict(id2label={0: "cat", 2: "dog"}), r"id2label keys must be the class indices"),
    ("id2label key not an index", dict(id2label={"cat": "cat"}), r"id2label keys must be class indices"),
    ("problem_type unknown", dict(problem_type="ranking"), r"problem_type must be one of"),
    ("na_backend unknown", dict(na_backend="cuda"), r"na_backend must be one of"),
    ("out_features unknown stage", dict(out_features=["stage9"]), r"out_features"),
    ("model too large", dict(embed_dim=4096, num_heads=[32, 64, 128, 256]), r"parameters, more than the limit"),
]


@pytest.mark.parametrize("overrides, message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_constructor_refuses(overrides, message):
    with pytest.raises(ValueError, match=message):
        DinatConfig(**overrides)


FILE_CASES = [  # (case, config.json text, regex; the message must also name the file)
    ("a JSON list", "[1, 2]", r"corrupt config.json: holds a JSON list"),
    ("nested 100000 deep", "[" * 100_000 + "]" * 100_000, r"corrupt config.json: JSON nested more than 100"),
    ("num_labels 1e9", json.dumps({"model_type": "dinat", "num_labels": 1e9}), r"num_labels must be an integer"),
    ("mlp_ratio as a string", json.dumps({"model_type": "dinat", "mlp_ratio": "2"}), r"mlp_ratio must be a number"),
    ("unknown activation", json.dumps({"model_type": "dinat", "hidden_act": "swishy"}), r"hidden_act"),
    ("torch_dtype float13", json.dumps({"model_type": "dinat", "torch_dtype": "float13"}), r"torch_dtype"),
    ("depths not a list", json.dumps({"model_type": "dinat", "depths": 4}), r"depths must be a list"),
    ("bool as a string", json.dumps({"model_type": "dinat", "use_rpb": "true"}), r"use_rpb"),
]
LOADERS = {
    "DinatConfig.from_pretrained": lambda folder: DinatConfig.from_pretrained(folder),
    "DinatConfig.from_json_file": lambda folder: DinatConfig.from_json_file(folder / "config.json"),
    "DinatForImageClassification.from_pretrained": lambda folder: DinatForImageClassification.from_pretrained(folder),
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("text, message", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_config_file_refused_naming_field_and_file(tmp_path, loader, text, message):
    (tmp_path / "config.json").write_text(text)
    shutil.copy(MODEL / "model.safetensors", tmp_path)
    with pytest.raises(ValueError, match=message) as caught:
        LOADERS[loader](tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_invalid_json_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="config.json"):  # transformers' own error type for an unparsable file
        DinatConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: corrupt config.json: invalid JSON"):
        DinatConfig.from_json_file(tmp_path / "config.json")


KWARG_CASES = [  # (case, from_pretrained keyword arguments, regex)
    ("mlp_ratio as a string", dict(mlp_ratio="2"), r"from_pretrained\(.*mlp_ratio=.*mlp_ratio must be a number"),
    ("unknown activation", dict(hidden_act="swishy"), r"hidden_act=.*hidden_act"),
    ("num_labels -1", dict(num_labels=-1), r"num_labels"),
    ("dtype float13 in the config", dict(torch_dtype="float13"), r"torch_dtype"),
    ("kernel_size even", dict(kernel_size=4), r"kernel_size=.*kernel_size must be odd"),
]


@pytest.mark.parametrize("kwargs, message", [c[1:] for c in KWARG_CASES], ids=[c[0] for c in KWARG_CASES])
def test_from_pretrained_kwargs_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DinatConfig.from_pretrained(MODEL, **kwargs)
    if "dtype" not in "".join(kwargs):  # the model's own `dtype` argument is for the weights, not the config
        with pytest.raises(ValueError, match=message):
            DinatForImageClassification.from_pretrained(MODEL, **kwargs)


def test_valid_kwargs_still_apply_and_round_trip(tmp_path):
    config = DinatConfig.from_pretrained(MODEL, mlp_ratio=2.0, drop_path_rate=0.0, num_labels=5)
    assert config.mlp_ratio == 2.0 and config.drop_path_rate == 0.0 and config.num_labels == 5
    config.save_pretrained(tmp_path)
    assert DinatConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize("preset", ["mini", "tiny", "base", "large-11x11-384"])
def test_parameter_estimate_behind_the_size_limit_is_close(preset):
    # the size limit uses an estimate; it must track the real count (here within 2%)
    config = DinatConfig.from_preset(preset, num_labels=1000)
    with torch.device("meta"):
        real = sum(p.numel() for p in DinatForImageClassification(config).parameters())
    assert abs(estimated_parameters(config) - real) / real < 0.02
    assert estimated_parameters(config) < MAX_PARAMETERS


# =================================================================================================
# Images
# =================================================================================================
def _write_phone_photo(path: Path) -> np.ndarray:
    """A JPEG as a phone stores a portrait shot: pixels sideways plus EXIF Orientation 6 ("rotate 90 CW to
    view"). Returns the upright picture: top half red, bottom half blue, 60 wide and 40 tall."""
    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:20] = (255, 0, 0)
    upright[20:] = (0, 0, 255)
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(path, exif=exif.tobytes(), quality=95)
    return upright


def _plain(size) -> DinatImageProcessor:
    return DinatImageProcessor(size=size, do_normalize=False)


def test_exif_orientation_is_applied_for_files_and_pil_images(tmp_path):
    path = tmp_path / "phone.jpg"
    _write_phone_photo(path)
    processor = _plain({"height": 40, "width": 60})
    with Image.open(path) as opened:
        pil_result = processor(opened, return_tensors="np")["pixel_values"][0]
    for result in (processor(path, return_tensors="np")["pixel_values"][0], pil_result):
        assert result.shape == (3, 40, 60)
        assert result[0, :18].min() > 0.9 and result[2, :18].max() < 0.1  # top rows red
        assert result[2, 22:].min() > 0.9 and result[0, 22:].max() < 0.1  # bottom rows blue


def test_predict_and_pipeline_agree_on_a_rotated_phone_photo(tmp_path):
    from transformers import pipeline

    from dinat.inference import checkpoint_processor, classify, load_classifier

    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    shutil.copy(VIT_PROCESSOR, folder)  # the hub checkpoints' form: pipeline uses transformers' ViT processor
    photo = tmp_path / "phone.jpg"
    _write_phone_photo(photo)
    model = load_classifier(str(folder))
    processor = checkpoint_processor(str(folder))
    ours = classify(model, processor, [str(photo)], top_k=model.config.num_labels)[0]["predictions"]
    theirs = pipeline("image-classification", model=str(folder))(str(photo), top_k=model.config.num_labels)
    ours_by_label = {p["label"]: p["score"] for p in ours}
    for row in theirs:
        assert ours_by_label[row["label"]] == pytest.approx(row["score"], abs=1e-4)
    # and it matters: the same photo without its orientation gets other probabilities
    with Image.open(photo) as opened:
        sideways = opened.copy()
    sideways.info.pop("exif", None)
    sideways.getexif().clear()
    unrotated = classify(model, processor, [sideways], top_k=model.config.num_labels)[0]["predictions"]
    assert max(abs(ours_by_label[p["label"]] - p["score"]) for p in unrotated) > 1e-3


def _float_tiff_with(path: Path, value: float) -> Path:
    plane = np.random.default_rng(0).random((30, 40)).astype(np.float32)
    plane[3, 4] = value
    Image.fromarray(plane, mode="F").save(path)
    return path


def _strip_png(path: Path) -> Path:
    Image.new("L", (60000, 1)).save(path)  # a few hundred bytes
    return path


def _checkerboard() -> np.ndarray:
    yy, xx = np.mgrid[:150, :170]
    return np.stack([((yy // 7 + xx // 5) % 2 * 255).astype(np.uint8)] * 3, axis=-1)


IMAGE_ERROR_CASES = [  # (case, make the input from tmp_path, processor settings, regex naming the image)
    ("float TIFF with a NaN pixel", lambda d: _float_tiff_with(d / "nan.tif", math.nan), dict(size=224),
     r"input 0 \('.*nan\.tif'\): image contains NaN or infinite pixel values \(1 NaN"),
    ("float TIFF with an Inf pixel", lambda d: _float_tiff_with(d / "inf.tif", math.inf), dict(size=224),
     r"inf\.tif'\): image contains NaN or infinite .*1 infinite"),
    ("float array with Inf, second in a list",
     lambda d: [np.zeros((8, 8, 3), np.float32), np.full((8, 8, 3), np.inf, np.float32)], dict(size=224),
     r"input 1: image contains NaN or infinite"),
    ("float tensor with NaN", lambda d: torch.full((3, 8, 8), math.nan), dict(size=224),
     r"input 0: image contains NaN"),
    ("60000x1 PNG through shortest_edge", lambda d: _strip_png(d / "strip.png"), dict(size={"shortest_edge": 224}),
     r"strip\.png'\): resizing this 60000x1 image gives .* more than the limit of 67108864 .*MAX_RESIZE_PIXELS"),
    ("60000x1 PNG through crop_pct", lambda d: _strip_png(d / "strip.png"), dict(size=224, crop_pct=0.875),
     r"strip\.png'\): resizing .* more than the limit of 67108864"),
    ("array of unusable shape", lambda d: np.zeros((10, 10, 2), np.uint8), dict(size=224),
     r"input 0: array of shape \(10, 10, 2\) has no channel axis"),
]


@pytest.mark.parametrize("make, settings, message", [c[1:] for c in IMAGE_ERROR_CASES],
                         ids=[c[0] for c in IMAGE_ERROR_CASES])
def test_bad_images_refused_naming_the_image(tmp_path, make, settings, message):
    with pytest.raises(ValueError, match=message):
        DinatImageProcessor(**settings)(make(tmp_path))


SETTINGS_CASES = [  # (case, preprocessor_config.json text, regex; the message must name the file)
    ("size 100000", json.dumps({"size": 100000}), r"size\['height'\] = 100000 is larger than the limit of 8192"),
    ("shortest_edge 100000", json.dumps({"size": {"shortest_edge": 100000}}), r"limit of 8192"),
    ("crop_size 100000", json.dumps({"do_center_crop": True, "crop_size": 100000}), r"crop_size.*limit of 8192"),
    ("invalid JSON", "{oops", r"corrupt preprocessor_config.json: invalid JSON"),
    ("a JSON list", "[224]", r"corrupt preprocessor_config.json: holds a JSON list"),
    ("nested deep", "[" * 50_000 + "]" * 50_000, r"corrupt preprocessor_config.json: JSON nested"),
]


@pytest.mark.parametrize("text, message", [c[1:] for c in SETTINGS_CASES], ids=[c[0] for c in SETTINGS_CASES])
def test_bad_preprocessor_config_refused_naming_the_file(tmp_path, text, message):
    from dinat.hub import CheckpointNotFoundError

    (tmp_path / "preprocessor_config.json").write_text(text)
    for source in (tmp_path, tmp_path / "preprocessor_config.json"):
        with pytest.raises(ValueError, match=message) as caught:
            DinatImageProcessor.from_pretrained(source)
        assert str(tmp_path) in str(caught.value)
        assert not isinstance(caught.value, (OSError, CheckpointNotFoundError))  # corrupt, not "missing"


def test_decompression_bomb_refused_whatever_the_warnings_filter(monkeypatch):
    path = FIXTURES / "processor" / "images" / "rgba_64.png"  # 64x64 = 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: PIL itself only warns
    processor = DinatImageProcessor(size=32)
    with warnings.catch_warnings():  # what another thread may have set, process-wide
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"rgba_64\.png'\): image is larger than PIL's decompression-bomb limit"):
            processor(path)
        with Image.open(path) as lazy:  # a PIL image opened but not decoded by the caller
            with pytest.raises(ValueError, match=r"input 0: image is larger than PIL's decompression-bomb"):
                processor(lazy)
    in_memory = Image.new("RGB", (64, 64))  # made in memory, not decoded from a file: not limited
    assert processor(in_memory)["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("resample", [2, 3])
@pytest.mark.parametrize("name", ["checkerboard", "noise_tall_200x300", "gray_150x100", "rgba_64"])
def test_uint8_and_float_copies_agree_after_resize(name, resample):
    # one clipping rule: the filter's overshoot is clipped after each pass for every input type, so the copies
    # differ only by PIL's 8-bit rounding (before: up to 43 levels on these images with bicubic)
    if name == "checkerboard":
        image = _checkerboard()
    else:
        with Image.open(FIXTURES / "processor" / "images" / f"{name}.png") as opened:
            image = np.asarray(opened.convert("RGB"))
    processor = DinatImageProcessor(size=224, resample=resample)
    from_uint8 = processor(image, return_tensors="np")["pixel_values"][0]
    from_float = processor(image.astype(np.float32) / 255, return_tensors="np")["pixel_values"][0]
    levels = np.abs(from_uint8 - from_float) * IMAGENET_STD * 255
    assert levels.max() <= 1.1  # one level, plus the rounding of PIL's intermediate 8-bit pass


def test_ambiguous_array_layout_is_read_as_transformers_reads_it():
    from transformers import ViTImageProcessorPil

    ambiguous = np.random.default_rng(1).integers(0, 256, (3, 50, 3), dtype=np.uint8)  # CHW or HWC?
    ours = DinatImageProcessor(size=224, resample=3)(ambiguous, return_tensors="np")["pixel_values"]
    theirs = ViTImageProcessorPil(size={"height": 224, "width": 224}, resample=3,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])(
        ambiguous, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    as_hwc = DinatImageProcessor(size=224, resample=3)(ambiguous.transpose(1, 2, 0), return_tensors="np")
    np.testing.assert_array_equal(ours, as_hwc["pixel_values"])  # taken as channels-first (3 channels, 50x3)


PROCESSOR_SETTING_CASES = [  # (case, DinatImageProcessor keyword arguments, regex naming the setting)
    ("flag as a string", dict(do_normalize="false"), r"do_normalize must be True or False"),
    ("do_resize as a number", dict(do_resize=0), r"do_resize must be True or False"),
    ("NaN in image_std", dict(image_std=[0.2, math.nan, 0.2]), r"image_std\[1\] must be a finite number"),
    ("image_mean as a string", dict(image_mean="0.5"), r"image_mean must be a finite number"),
    ("rescale_factor 0", dict(rescale_factor=0), r"rescale_factor must be positive"),
    ("crop_pct as a string", dict(size=224, crop_pct="0.875"), r"crop_pct must be a finite number"),
    ("size 0", dict(size=0), r"size\['height'\] must be a positive integer"),
]


@pytest.mark.parametrize("settings, message", [c[1:] for c in PROCESSOR_SETTING_CASES],
                         ids=[c[0] for c in PROCESSOR_SETTING_CASES])
def test_bad_processor_settings_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        DinatImageProcessor(**settings)
