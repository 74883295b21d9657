"""DiNAT backbones inside transformers' dense-prediction heads (UperNet, Mask2Former, MaskFormer, OneFormer,
ViTMatte, DETR): parity with the reference stack, training, save/load and the image-segmentation pipeline.

`import dinat` registers this package's `DinatBackbone` for `model_type` "dinat", which is how these heads build
their backbone from `backbone_config`. Fixtures (`tests/fixtures/dense/`) come from transformers 4.46.3 + NATTEN
0.17.5 (`make_dense_fixtures.py` in the oracle); the configs below that have no fixture are small on purpose.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dinat  # noqa: F401  (registers DiNAT with transformers' Auto classes)
from conftest import FIXTURES, FOUR_STAGES, REFERENCE_TOL, TESTS, tiny_config
from dinat import DinatBackbone, DinatConfig

DENSE = FIXTURES / "dense"


def backbone_of(model) -> DinatBackbone:
    """The DiNAT backbone inside a head (heads keep it under different names)."""
    backbones = [module for module in model.modules() if isinstance(module, DinatBackbone)]
    assert len(backbones) == 1, f"{type(model).__name__} holds {len(backbones)} DinatBackbones"
    return backbones[0]


def assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(got, expected, **REFERENCE_TOL, msg=name)


# -------------------------------------------------------------------------------------------------
# Parity with the reference stack
# -------------------------------------------------------------------------------------------------
def test_upernet_matches_reference_outputs_loss_and_backbone_gradients():
    from transformers import UperNetForSemanticSegmentation

    model = UperNetForSemanticSegmentation.from_pretrained(DENSE / "upernet_small" / "model")
    io = load_file(DENSE / "upernet_small" / "io.safetensors")
    model.eval()
    with torch.no_grad():
        # UperNet calls backbone.forward_with_filtered_kwargs (transformers' BackboneMixin)
        logits = model(pixel_values=io["pixel_values"]).logits
        feature_maps = model.backbone(io["pixel_values"]).feature_maps
    assert_close_to_reference(logits, io["logits"], "logits")
    assert len(feature_maps) == 4
    for i, feature_map in enumerate(feature_maps):
        assert_close_to_reference(feature_map, io[f"backbone.feature_maps.{i}"], f"feature map {i}")

    model.train()  # dropout and drop path are 0 in this config, as in the reference run
    loss = model(pixel_values=io["pixel_values"], labels=io["labels"]).loss
    loss.backward()
    assert_close_to_reference(loss.detach().reshape(1), io["loss"], "loss")
    expected = {key[len("grad."):]: value for key, value in io.items() if key.startswith("grad.")}
    got = {name: p.grad for name, p in model.named_parameters() if name.startswith("backbone.")}
    assert set(got) == set(expected)  # every backbone parameter, no more and no fewer
    for name, grad in got.items():
        scale = expected[name].abs().max().clamp(min=1e-12)
        assert (grad - expected[name]).abs().max() <= 1e-4 * scale + 1e-6, name


def test_oneformer_hub_layout_matches_reference():
    from transformers import OneFormerForUniversalSegmentation

    config = json.loads((DENSE / "oneformer_small" / "model" / "config.json").read_text())
    assert config["backbone_config"]["model_type"] == "dinat"  # the shi-labs/oneformer_*_dinat_* layout
    model = OneFormerForUniversalSegmentation.from_pretrained(DENSE / "oneformer_small" / "model").eval()
    io = load_file(DENSE / "oneformer_small" / "io.safetensors")
    with torch.no_grad():
        outputs = model(pixel_values=io["pixel_values"], task_inputs=io["task_inputs"])
        feature_maps = backbone_of(model)(io["pixel_values"]).feature_maps
    assert_close_to_reference(outputs.class_queries_logits, io["class_queries_logits"], "class_queries_logits")
    assert_close_to_reference(outputs.masks_queries_logits, io["masks_queries_logits"], "masks_queries_logits")
    for i, feature_map in enumerate(feature_maps):
        assert_close_to_reference(feature_map, io[f"backbone.feature_maps.{i}"], f"feature map {i}")


# -------------------------------------------------------------------------------------------------
# Every head that builds its backbone with AutoBackbone: forward, loss, backward, save/load
# -------------------------------------------------------------------------------------------------
def small_backbone(**overrides) -> DinatConfig:
    """conftest's four-stage tiny DiNAT with every stage an output (unless overridden)."""
    return tiny_config(**{**FOUR_STAGES, "out_features": ["stage1", "stage2", "stage3", "stage4"], **overrides})


def masks_and_classes(generator, batch: int, size: int, num_labels: int):
    """Per image: two binary masks (a random split of the image) and their classes."""
    masks, classes = [], []
    for _ in range(batch):
        top = (torch.rand(size, size, generator=generator) > 0.5).float()
        masks.append(torch.stack([top, 1 - top]))
        classes.append(torch.randint(0, num_labels, (2,), generator=generator))
    return {"mask_labels": masks, "class_labels": classes}


def build_head(head: str):
    """(model, inputs with labels, Auto class that reloads it) for a small head on a small DiNAT backbone."""
    import transformers as tf

    generator = torch.Generator().manual_seed(0)
    size, batch = 64, 2
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    torch.manual_seed(0)
    if head == "upernet":
        config = tf.UperNetConfig(backbone_config=small_backbone(), hidden_size=32, auxiliary_in_channels=64,
                                  auxiliary_channels=16, num_labels=4)
        labels = {"labels": torch.randint(0, 4, (batch, size, size), generator=generator)}
        return tf.UperNetForSemanticSegmentation(config), {"pixel_values": pixels, **labels}, \
            tf.AutoModelForSemanticSegmentation
    if head == "mask2former":
        config = tf.Mask2FormerConfig(backbone_config=small_backbone(), hidden_dim=32, feature_size=32,
                                      mask_feature_size=32, num_queries=8, encoder_feedforward_dim=64,
                                      dim_feedforward=64, decoder_layers=2, encoder_layers=1, num_attention_heads=2,
                                      num_labels=3, train_num_points=256)
        return tf.Mask2FormerForUniversalSegmentation(config), \
            {"pixel_values": pixels, **masks_and_classes(generator, batch, size, 3)}, \
            tf.AutoModelForUniversalSegmentation
    if head == "maskformer":
        decoder = dict(model_type="detr", d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
        config = tf.MaskFormerConfig(backbone_config=small_backbone(), num_queries=8, fpn_feature_size=32,
                                     mask_feature_size=32, decoder_config=decoder, num_labels=3)
        return tf.MaskFormerForInstanceSegmentation(config), \
            {"pixel_values": pixels, **masks_and_classes(generator, batch, size, 3)}, \
            tf.AutoModelForInstanceSegmentation
    if head == "oneformer":
        config = tf.OneFormerConfig(backbone_config=small_backbone(), num_labels=3, hidden_dim=32, conv_dim=32,
                                    mask_dim=32, num_queries=8, dim_feedforward=64, decoder_layers=2,
                                    encoder_layers=1, encoder_feedforward_dim=64, text_encoder_width=32,
                                    text_encoder_num_layers=1, text_encoder_context_length=16,
                                    text_encoder_proj_layers=1, text_encoder_n_ctx=2, task_seq_len=16,
                                    max_seq_len=16, num_attention_heads=2, train_num_points=256)
        # in training, OneFormer contrasts its queries with a text per query (num_queries - n_ctx texts)
        inputs = {"pixel_values": pixels, "task_inputs": torch.randint(0, 1000, (batch, 16), generator=generator),
                  "text_inputs": torch.randint(0, 1000, (batch, 6, 16), generator=generator),
                  **masks_and_classes(generator, batch, size, 3)}
        return tf.OneFormerForUniversalSegmentation(config), inputs, tf.AutoModelForUniversalSegmentation
    if head == "vitmatte":
        # image + trimap in, alpha matte out: a single stride-16 feature map, as ViTMatte's ViTDet backbone gives
        config = tf.VitMatteConfig(backbone_config=small_backbone(num_channels=4, out_features=["stage3"]),
                                   hidden_size=64, convstream_hidden_sizes=[8, 16, 32], fusion_hidden_sizes=[32, 16, 8, 8])
        inputs = {"pixel_values": torch.randn(batch, 4, size, size, generator=generator),
                  "labels": torch.rand(batch, 1, size, size, generator=generator)}
        return tf.VitMatteForImageMatting(config), inputs, tf.AutoModelForImageMatting
    if head == "detr":
        # DETR reads the last feature map only
        config = tf.DetrConfig(use_timm_backbone=False, backbone_config=small_backbone(out_features=["stage4"]),
                               d_model=32,
                               encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                               encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=8, num_labels=3)
        boxes = [{"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.4], [0.7, 0.6, 0.3, 0.3]])}
                 for _ in range(batch)]
        return tf.DetrForObjectDetection(config), {"pixel_values": pixels, "labels": boxes}, \
            tf.AutoModelForObjectDetection
    raise ValueError(head)


def stages_after_the_last_output(backbone: DinatBackbone) -> set[str]:
    """Parameter names that only feed stages after the last one in `out_features` (stage i is level i - 1; the
    downsampler at the end of level i feeds stage i + 2)."""
    last = max(int(name[len("stage"):]) for name in backbone.config.out_features)
    unused = set()
    for name, _ in backbone.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["encoder", "levels"]:
            level = int(parts[2])
            if level + 1 > last or (parts[3] == "downsample" and level + 2 > last):
                unused.add(name)
    return unused


HEADS = ["upernet", "mask2former", "maskformer", "oneformer", "vitmatte", "detr"]


def outputs_of(model, inputs) -> dict[str, torch.Tensor]:
    inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", "task_inputs")}
    with torch.no_grad():
        outputs = model.eval()(**inputs)
    return {k: v for k, v in outputs.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("head", HEADS)
def test_head_trains_and_reloads(head, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Backbone dinat is not a supported model ..." (it is, here)
        model, inputs, auto_class = build_head(head)
    backbone = backbone_of(model)

    model.train()
    if head == "vitmatte":  # transformers' ViTMatte has no loss yet ("Training is not yet supported"): L1 to the matte
        labels = inputs["labels"]
        loss = (model(pixel_values=inputs["pixel_values"]).alphas - labels).abs().mean()
    else:
        loss = model(**inputs).loss
    assert loss.numel() == 1 and torch.isfinite(loss).all()  # OneFormer's loss has shape (1,)
    loss = loss.sum()
    loss.backward()
    unused = stages_after_the_last_output(backbone)
    for name, param in backbone.named_parameters():
        if name in unused:  # what no output needs gets no gradient (DDP calls these unused parameters)
            assert param.grad is None, name
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    # the loss reaches the first layer of the backbone through every stage it uses
    assert backbone.embeddings.patch_embeddings.projection[0].weight.grad.abs().sum() > 0

    expected = outputs_of(model, inputs)
    model.save_pretrained(tmp_path / head)
    saved = json.loads((tmp_path / head / "config.json").read_text())
    assert saved["backbone_config"]["model_type"] == "dinat"
    reloaded = auto_class.from_pretrained(tmp_path / head)
    backbone_of(reloaded)
    # every weight comes back bit for bit, and the backbone's features with them
    expected_state = model.state_dict()
    assert all(torch.equal(value, expected_state[key]) for key, value in reloaded.state_dict().items())
    with torch.no_grad():
        for got_map, expected_map in zip(backbone_of(reloaded)(inputs["pixel_values"]).feature_maps,
                                         backbone.eval()(inputs["pixel_values"]).feature_maps):
            assert torch.equal(got_map, expected_map)
    # the heads' own oneDNN convolutions may differ in the last bits between two copies of the same weights
    # (seen single-threaded on an AMD EPYC: 6e-9 in UperNet's logits)
    got = outputs_of(reloaded, inputs)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)


# -------------------------------------------------------------------------------------------------
# pipeline("image-segmentation") with locally built processors, and examples/segment.py
# -------------------------------------------------------------------------------------------------
ADE_CLASSES = {0: ("wall", 0), 1: ("building", 0), 2: ("sky", 0), 3: ("tree", 0), 4: ("person", 1)}  # name, thing


def structured_image(height: int = 96, width: int = 128) -> Image.Image:
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([cols * 2, rows * 2, 255 - cols], -1) % 256
    pixels[height // 3:2 * height // 3, width // 4:width // 2] = (200, 40, 40)
    return Image.fromarray(pixels.astype(np.uint8))


def tiny_oneformer_checkpoint(folder: Path) -> Path:
    """A small OneFormer on DiNAT saved as the hub's shi-labs/oneformer_*_dinat_* repos are: model, image
    processor (its class list in a JSON file the processor loads from `repo_path`, here `folder` itself) and a
    CLIP tokenizer."""
    import transformers as tf

    names = {i: name for i, (name, _) in ADE_CLASSES.items()}
    config = tf.OneFormerConfig(backbone_config=small_backbone(), num_labels=len(names), id2label=names,
                                label2id={n: i for i, n in names.items()}, hidden_dim=32, conv_dim=32, mask_dim=32,
                                num_queries=8, dim_feedforward=64, decoder_layers=2, encoder_layers=1,
                                encoder_feedforward_dim=64, text_encoder_width=32, text_encoder_num_layers=1,
                                text_encoder_context_length=77, text_encoder_proj_layers=1, text_encoder_n_ctx=2,
                                task_seq_len=77, num_attention_heads=2)
    torch.manual_seed(3)
    model = tf.OneFormerForUniversalSegmentation(config)
    with torch.no_grad():  # spread the class scores so that several classes win somewhere
        for name, param in model.named_parameters():
            if any(part in name for part in ("class_predictor", "mask_embed", "queries_embedder")):
                param.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    (folder / "classes.json").write_text(json.dumps(
        {str(i): {"name": name, "isthing": thing} for i, (name, thing) in ADE_CLASSES.items()}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision ...; falling back to the PIL processor"
        image_processor = tf.OneFormerImageProcessor(
            repo_path=str(folder), class_info_file="classes.json", num_text=6,
            size={"shortest_edge": 64, "longest_edge": 128}, do_reduce_labels=False)
    # special tokens only (the task text maps to unknowns); padding with id 0, as OneFormerProcessor pads task
    # texts, so that the pipeline (which pads with the tokenizer) and the processor give the model the same ids
    tokenizer = tf.CLIPTokenizer(vocab={"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, merges=[],
                                 pad_token="!", model_max_length=77)
    tf.OneFormerProcessor(image_processor=image_processor, tokenizer=tokenizer, max_seq_length=77,
                          task_seq_length=77).save_pretrained(folder)
    return folder


def semantic_labels(folder: Path, image: Image.Image) -> np.ndarray:
    """The semantic label map straight from model + processor (no pipeline): the expectation."""
    import transformers as tf

    processor = tf.OneFormerProcessor.from_pretrained(folder)
    model = tf.OneFormerForUniversalSegmentation.from_pretrained(folder).eval()
    inputs = processor(images=image, task_inputs=["semantic"], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    return labels.numpy()


def test_pipeline_segments_with_upernet_and_a_local_processor(tmp_path):
    import transformers as tf

    folder = tmp_path / "upernet"
    model = tf.UperNetForSemanticSegmentation.from_pretrained(DENSE / "upernet_small" / "model").eval()
    model.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf.SegformerImageProcessor(size={"height": 128, "width": 160}, do_reduce_labels=False).save_pretrained(folder)
    image = structured_image()
    segmenter = tf.pipeline("image-segmentation", model=str(folder))
    segments = segmenter(image)
    # expectation without the pipeline: resize + normalize, logits upsampled bilinearly to the image, argmax
    processor = tf.SegformerImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**processor(images=image, return_tensors="pt")).logits
    expected = torch.nn.functional.interpolate(logits, size=image.size[::-1], mode="bilinear",
                                               align_corners=False).argmax(1)[0].numpy()
    assert {s["label"] for s in segments} == {model.config.id2label[int(i)] for i in np.unique(expected)}
    for segment in segments:
        label_id = model.config.label2id[segment["label"]]
        np.testing.assert_array_equal(np.asarray(segment["mask"]) > 0, expected == label_id)


def test_pipeline_segments_with_oneformer_and_a_local_processor(tmp_path):
    from transformers import pipeline

    folder = tiny_oneformer_checkpoint(tmp_path / "oneformer")
    image = structured_image()
    segments = pipeline("image-segmentation", model=str(folder))(image, subtask="semantic")
    expected = semantic_labels(folder, image)
    assert len(np.unique(expected)) >= 2  # a map worth comparing
    label2id = {name: i for i, (name, _) in ADE_CLASSES.items()}
    got = np.full(expected.shape, -1)
    for segment in segments:
        got[np.asarray(segment["mask"]) > 0] = label2id[segment["label"]]
    np.testing.assert_array_equal(got, expected)


def test_segment_example_writes_the_overlay_for_a_hub_id_offline(tmp_path):
    """examples/segment.py with the README's hub id, resolved offline from a local hub cache holding a tiny
    checkpoint in that repo's layout (its processor reads the class list from the dataset repo
    shi-labs/oneformer_demo, as the hub checkpoints do)."""
    import subprocess
    import sys

    from hub_cache_helpers import offline_env, write_hub_repo

    spec = importlib.util.spec_from_file_location("segment", TESTS.parent / "examples" / "segment.py")
    segment = importlib.util.module_from_spec(spec)  # the script as a module: its colours are the expectation
    spec.loader.exec_module(segment)

    saved = tiny_oneformer_checkpoint(tmp_path / "saved")
    repo, metadata = tmp_path / "repo", tmp_path / "metadata"
    repo.mkdir()
    metadata.mkdir()
    for path in saved.iterdir():
        (metadata if path.name == "classes.json" else repo).joinpath(path.name).write_bytes(path.read_bytes())
    processor_config = json.loads((repo / "processor_config.json").read_text())
    processor_config["image_processor"]["repo_path"] = "shi-labs/oneformer_demo"
    (repo / "processor_config.json").write_text(json.dumps(processor_config))
    cache = tmp_path / "hub"
    for repo_id, folder, kind in (("shi-labs/oneformer_ade20k_dinat_large", repo, "models"),
                                  ("shi-labs/oneformer_demo", metadata, "datasets")):
        write_hub_repo(cache, repo_id, {p.name: p.read_bytes() for p in sorted(folder.iterdir())}, kind)
    image = structured_image()
    image.save(tmp_path / "street.png")

    result = subprocess.run(
        [sys.executable, segment.__file__, str(tmp_path / "street.png"),
         "--model", "shi-labs/oneformer_ade20k_dinat_large", "--out", str(tmp_path / "overlay.png")],
        env=offline_env(cache, tmp_path / "home"), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"overlay: {tmp_path / 'overlay.png'}" in result.stdout

    # expectation: the label map from model + processor, each pixel blended with its class colour
    labels = semantic_labels(saved, image)
    present = np.unique(labels)
    assert len(present) >= 2
    written = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).astype(int)
    assert written.shape[0] == image.height + 16 * len(present) + 6 and written.shape[1] >= image.width
    picture = written[:image.height, :image.width]
    original = np.asarray(image).astype(float)
    for label_id in present:
        colour = np.array(segment.class_colour(int(label_id)), dtype=float)
        blended = np.round(0.45 * original + 0.55 * colour)
        mask = labels == label_id
        assert np.abs(picture[mask] - blended[mask]).max() <= 1, ADE_CLASSES[int(label_id)][0]
    for label_id in present:
        assert f"{ADE_CLASSES[int(label_id)][0]}: " in result.stdout  # the legend, printed too
