"""DinatImageProcessor against golden pixel values from transformers 4.46.3's ViTImageProcessor and against
transformers' own processors for the other transforms; input kinds, image modes, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from dinat import DinatImageProcessor
from dinat.image_processing_dinat import decode_image

PROCESSOR_FIXTURES = Path(__file__).parent / "fixtures" / "processor"
IMAGES = PROCESSOR_FIXTURES / "images"
CONFIGS = ["vit_legacy_bicubic_224", "vit_bilinear_384"]
IMAGE_NAMES = sorted(p.stem for p in IMAGES.glob("*.png"))
ATOL = 1e-4


def golden(config_name: str) -> dict[str, np.ndarray]:
    return load_file(str(PROCESSOR_FIXTURES / config_name / "pixel_values.safetensors"))


def as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


# -------------------------------------------------------------------------------------------------
# Golden parity
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_name", CONFIGS)
def test_matches_reference_for_path_and_pil(config_name):
    processor = DinatImageProcessor.from_pretrained(PROCESSOR_FIXTURES / config_name)
    reference = golden(config_name)
    assert sorted(reference) == IMAGE_NAMES
    for name in IMAGE_NAMES:
        path = IMAGES / f"{name}.png"
        expected = reference[name]
        from_path = processor(str(path), return_tensors="np")["pixel_values"]
        from_pathlib = processor(path, return_tensors="np")["pixel_values"]
        with Image.open(path) as image:
            from_pil = processor(image, return_tensors="np")["pixel_values"]
        for got in (from_path, from_pathlib, from_pil):
            assert got.dtype == np.float32 and got.shape == expected.shape
            np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=f"{config_name}/{name}")


def test_batch_of_paths_matches_reference_per_image():
    processor = DinatImageProcessor.from_pretrained(PROCESSOR_FIXTURES / "vit_legacy_bicubic_224")
    reference = golden("vit_legacy_bicubic_224")
    batch = processor([IMAGES / f"{n}.png" for n in IMAGE_NAMES], return_tensors="pt")["pixel_values"]
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32
    assert batch.shape == (len(IMAGE_NAMES), 3, 224, 224)
    for i, name in enumerate(IMAGE_NAMES):
        np.testing.assert_allclose(batch[i:i + 1].numpy(), reference[name], atol=ATOL, rtol=0)


def test_reads_both_config_forms():
    legacy = DinatImageProcessor.from_pretrained(PROCESSOR_FIXTURES / "vit_legacy_bicubic_224")
    assert legacy.size == {"height": 224, "width": 224} and int(legacy.resample) == 3
    assert legacy.do_rescale and legacy.rescale_factor == pytest.approx(1 / 255)
    current = DinatImageProcessor.from_pretrained(PROCESSOR_FIXTURES / "vit_bilinear_384")
    assert current.size == {"height": 384, "width": 384} and int(current.resample) == 2
    assert current.input_size == (384, 384)


def test_saved_config_is_read_back_and_by_transformers(tmp_path):
    from transformers import AutoImageProcessor, ViTImageProcessorPil

    processor = DinatImageProcessor.from_pretrained(PROCESSOR_FIXTURES / "vit_legacy_bicubic_224")
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 224, "width": 224} and saved["resample"] == 3

    reloaded = AutoImageProcessor.from_pretrained(tmp_path)  # `import dinat` registered the class by name
    assert type(reloaded) is DinatImageProcessor
    # transformers' own ViT processor reads the same file and computes the same pixels
    vit = ViTImageProcessorPil.from_pretrained(tmp_path)
    expected = golden("vit_legacy_bicubic_224")
    for name in ("gradient_640x480", "noise_tall_200x300"):
        with Image.open(IMAGES / f"{name}.png") as image:
            ours = reloaded(image, return_tensors="np")["pixel_values"]
            theirs = vit(as_rgb(image), return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours, expected[name], atol=ATOL, rtol=0)
        np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


def test_crop_pct_evaluation_transform_matches_convnext_processor():
    # transformers' ConvNext processor implements the same evaluation transform for shortest_edge < 384:
    # shorter side to int(224 / crop_pct) = 256, then a 224 center crop. (Its crop offsets round down and ours
    # round half to even as torchvision does; they agree on these images.)
    from transformers import ConvNextImageProcessorPil

    ours = DinatImageProcessor(size=224, crop_pct=0.875, resample=3)
    theirs = ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875, resample=3,
                                       image_mean=ours.image_mean, image_std=ours.image_std)
    assert ours.input_size == (224, 224)
    for name in IMAGE_NAMES:
        with Image.open(IMAGES / f"{name}.png") as image:
            got = ours(image, return_tensors="np")["pixel_values"]
            expected = theirs(as_rgb(image), return_tensors="np")["pixel_values"]
        assert got.shape == (1, 3, 224, 224)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=name)


def test_shortest_edge_and_center_crop_match_clip_processor(tmp_path):
    from transformers import CLIPImageProcessorPil

    config = {"image_processor_type": "DinatImageProcessor", "size": {"shortest_edge": 224},
              "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "resample": 3,
              "do_rescale": True, "rescale_factor": 1 / 255, "image_mean": [0.485, 0.456, 0.406],
              "image_std": [0.229, 0.224, 0.225]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = DinatImageProcessor.from_pretrained(tmp_path)
    theirs = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   resample=3, image_mean=config["image_mean"], image_std=config["image_std"])
    for name in IMAGE_NAMES:
        with Image.open(IMAGES / f"{name}.png") as image:
            got = ours(image, return_tensors="np")["pixel_values"]
            expected = theirs(as_rgb(image), return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=name)


def test_shortest_edge_without_crop_keeps_aspect_ratio():
    processor = DinatImageProcessor(size={"shortest_edge": 100})
    out = processor([IMAGES / "gradient_640x480.png", IMAGES / "noise_tall_200x300.png"], return_tensors=None)
    assert [p.shape for p in out["pixel_values"]] == [(3, 100, 133), (3, 150, 100)]
    with pytest.raises(ValueError, match="different shapes"):
        processor([IMAGES / "gradient_640x480.png", IMAGES / "noise_tall_200x300.png"], return_tensors="pt")


# -------------------------------------------------------------------------------------------------
# Input kinds and image modes
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def legacy_processor():
    return DinatImageProcessor.from_pretrained(PROCESSOR_FIXTURES / "vit_legacy_bicubic_224")


def test_array_and_tensor_inputs_match_the_pil_image(legacy_processor):
    reference = golden("vit_legacy_bicubic_224")
    for name in ("gradient_640x480", "noise_224"):
        with Image.open(IMAGES / f"{name}.png") as image:
            hwc = np.array(image.convert("RGB"))
        chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
        inputs = {"numpy HWC uint8": hwc, "numpy CHW uint8": chw, "torch CHW uint8": torch.from_numpy(chw),
                  "torch HWC uint8": torch.from_numpy(hwc)}
        for kind, value in inputs.items():
            got = legacy_processor(value, return_tensors="np")["pixel_values"]
            np.testing.assert_allclose(got, reference[name], atol=ATOL, rtol=0, err_msg=f"{name} {kind}")

    # float input in [0, 1] is taken as already rescaled; at the model size nothing is resampled, so it is exact
    with Image.open(IMAGES / "noise_224.png") as image:
        hwc = np.asarray(image)
    for value in (hwc.astype(np.float32) / 255, torch.from_numpy(hwc.transpose(2, 0, 1).copy()).double() / 255):
        got = legacy_processor(value, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(got, reference["noise_224"], atol=ATOL, rtol=0)


def test_float_input_is_resized_like_uint8_up_to_rounding(legacy_processor):
    with Image.open(IMAGES / "gradient_640x480.png") as image:
        hwc = np.asarray(image)
    from_uint8 = legacy_processor(hwc, return_tensors="np")["pixel_values"]
    from_float = legacy_processor(hwc.astype(np.float32) / 255, return_tensors="np")["pixel_values"]
    # PIL's 8-bit path rounds to integers after each of its two passes (rows, then columns): under one level
    # of 255 apart, divided by the smallest std (0.224)
    np.testing.assert_allclose(from_float, from_uint8, atol=1 / 255 / 0.224, rtol=0)
    assert np.abs(from_float - from_uint8).mean() < 0.35 / 255 / 0.224  # rounding errors average about a quarter level


def test_mixed_list_and_4d_batch(legacy_processor):
    reference = golden("vit_legacy_bicubic_224")
    with Image.open(IMAGES / "noise_224.png") as image:
        pil = image.copy()
    hwc = np.asarray(pil)
    batch = legacy_processor([str(IMAGES / "rgba_64.png"), pil, hwc], return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(batch[0:1].numpy(), reference["rgba_64"], atol=ATOL, rtol=0)
    for i in (1, 2):
        np.testing.assert_allclose(batch[i:i + 1].numpy(), reference["noise_224"], atol=ATOL, rtol=0)
    stacked = torch.from_numpy(np.stack([hwc.transpose(2, 0, 1)] * 2))  # (2, 3, H, W) uint8
    out = legacy_processor(stacked, return_tensors="np")["pixel_values"]
    assert out.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(out[1:], reference["noise_224"], atol=ATOL, rtol=0)


def test_return_tensors_kinds(legacy_processor):
    path = IMAGES / "noise_224.png"
    as_pt = legacy_processor(path, return_tensors="pt")["pixel_values"]
    as_np = legacy_processor(path, return_tensors="np")["pixel_values"]
    as_list = legacy_processor(path, return_tensors=None)["pixel_values"]
    assert isinstance(as_pt, torch.Tensor) and isinstance(as_np, np.ndarray) and isinstance(as_list, list)
    assert as_list[0].shape == (3, 224, 224) and as_list[0].dtype == np.float32
    np.testing.assert_array_equal(as_pt.numpy(), as_np)
    np.testing.assert_array_equal(as_np[0], as_list[0])
    with pytest.raises(ValueError, match="return_tensors"):
        legacy_processor(path, return_tensors="tf")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK"])
def test_8bit_modes_use_pils_rgb_conversion(legacy_processor, mode):
    with Image.open(IMAGES / "noise_tall_200x300.png") as image:
        converted = image.convert(mode)
    expected = legacy_processor(converted.convert("RGB"), return_tensors="np")["pixel_values"]
    got = legacy_processor(converted, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(got, expected)


def test_high_bit_depth_modes_are_scaled_to_8_bit_range(legacy_processor):
    # at the model size nothing is resampled, so a 16-bit / 32-bit / float copy of an 8-bit image must give the
    # 8-bit image's pixels exactly (up to float rounding)
    with Image.open(IMAGES / "noise_224.png") as image:
        gray = np.asarray(image.convert("L"))
    expected = legacy_processor(Image.fromarray(gray).convert("RGB"), return_tensors="np")["pixel_values"]
    variants = {
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257),
        "I": Image.fromarray(gray.astype(np.int32)),
        "F": Image.fromarray(gray.astype(np.float32) / 255),
    }
    for mode, image in variants.items():
        assert image.mode == mode
        got = legacy_processor(image, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=mode)


# -------------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_input(legacy_processor, tmp_path):
    good = IMAGES / "noise_224.png"
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:5000])
    cases = [
        ([], "empty list"),
        ([good, np.zeros((5,), np.uint8)], r"input 1.*2-D .* or 3-D"),
        (np.zeros((2, 2, 2, 2, 2), np.uint8), r"input 0.*got 5-D"),
        (np.zeros((10, 10, 2), np.uint8), r"input 0.*no channel axis of size 1, 3 or 4"),
        (np.zeros((0, 10, 3), np.uint8), r"input 0.*empty"),
        (Image.new("RGB", (0, 5)), r"input 0.*empty"),
        (np.full((8, 8, 3), 2.0, np.float32), r"input 0.*\[0, 1\]"),
        ([good, not_image], r"input 1 \(.*notes\.png.*\): not an image file"),
        ([truncated], r"input 0 \(.*truncated\.png.*\): cannot decode image"),
        ([tmp_path / "missing.png"], r"input 0 \(.*missing\.png.*\): no such file"),
        ([tmp_path], r"input 0 .*directory"),
        ([good, 42], r"input 1: unsupported input type int"),
    ]
    for value, message in cases:
        with pytest.raises(ValueError, match=message):
            legacy_processor(value)


def test_decompression_bomb_is_refused(legacy_processor, monkeypatch):
    path = IMAGES / "rgba_64.png"  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # past the limit: PIL only warns
    with pytest.raises(ValueError, match=r"input 0 \(.*rgba_64\.png.*\): image is larger than PIL's decompression"):
        legacy_processor(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # past twice the limit: PIL raises
    with pytest.raises(ValueError, match="decompression-bomb limit"):
        legacy_processor(path)


def test_bad_settings_raise_value_errors():
    with pytest.raises(ValueError, match="size"):
        DinatImageProcessor(size={"longest_edge": 3})
    with pytest.raises(ValueError, match="resample"):
        DinatImageProcessor(resample="sharpest")
    with pytest.raises(ValueError, match="crop_pct"):
        DinatImageProcessor(crop_pct=1.5)
    with pytest.raises(ValueError, match="unknown arguments"):
        DinatImageProcessor()(IMAGES / "noise_224.png", sizes=3)


def test_settings_round_trip_and_input_size(tmp_path):
    processor = DinatImageProcessor(size=224, crop_pct=0.875, resample="bicubic", image_mean=0.5, image_std=0.5)
    processor.save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "preprocessor_config.json"):
        reloaded = DinatImageProcessor.from_pretrained(source)
        assert reloaded.to_dict() == processor.to_dict()
    assert processor.input_size == (224, 224)
    assert DinatImageProcessor(size=64, do_center_crop=True, crop_size=48).input_size == (48, 48)
    assert DinatImageProcessor(size={"shortest_edge": 64}).input_size is None
    out = processor(IMAGES / "gradient_640x480.png", return_tensors="np")["pixel_values"]
    assert out.shape == (1, 3, 224, 224)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_decoded_image_gives_the_pixels_of_the_file(name, tmp_path):
    # decode_image is what dinat predict hands to transformers' pipeline: the processor must see the same image
    processor = DinatImageProcessor.from_variant("mini")
    path = IMAGES / f"{name}.png"
    decoded = decode_image(path)
    assert decoded.shape[0] == 3 and decoded.dtype == np.uint8
    np.testing.assert_array_equal(processor(decoded, return_tensors="np")["pixel_values"],
                                  processor(path, return_tensors="np")["pixel_values"])


def test_decoded_16_bit_image_keeps_its_range(tmp_path):
    plane = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    Image.fromarray(plane).save(tmp_path / "deep.png")
    decoded = decode_image(tmp_path / "deep.png")
    assert decoded.dtype == np.float32 and decoded.shape == (3, 64, 64)
    np.testing.assert_allclose(decoded[0], plane / 65535.0, atol=1e-6)
    processor = DinatImageProcessor(size=48)
    np.testing.assert_allclose(processor(decoded, return_tensors="np")["pixel_values"],
                               processor(tmp_path / "deep.png", return_tensors="np")["pixel_values"], atol=1e-5)


def test_from_variant_is_the_registered_evaluation_transform():
    large384 = DinatImageProcessor.from_variant("shi-labs/dinat-large-in22k-in1k-384")
    assert large384.input_size == (384, 384) and large384.crop_pct == 1.0 and large384.resample == 3
    mini = DinatImageProcessor.from_variant("mini")
    assert mini.crop_pct == 0.875 and mini.image_mean == [0.485, 0.456, 0.406]
    # the paper's 224 evaluation: shorter side to 256, center crop 224
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    expected = DinatImageProcessor(size={"shortest_edge": 256}, resample=3, do_center_crop=True, crop_size=224)
    np.testing.assert_array_equal(mini(image, return_tensors="np")["pixel_values"],
                                  expected(image, return_tensors="np")["pixel_values"])
    with pytest.raises(ValueError, match="unknown DiNAT preset"):
        DinatImageProcessor.from_variant("huge")
