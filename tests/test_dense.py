"""DiNAT backbones inside transformers' dense-prediction heads (UperNet, Mask2Former, MaskFormer, OneFormer,
ViTMatte, DETR): parity with the reference stack, training, save/load and the image-segmentation pipeline.

`import dinat` registers this package's `DinatBackbone` for `model_type` "dinat", which is how these heads build
their backbone from `backbone_config`. Fixtures (`tests/fixtures/dense/`) come from transformers 4.46.3 + NATTEN
0.17.5 (`make_dense_fixtures.py` in the oracle); the configs below that have no fixture are small on purpose.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dinat  # noqa: F401  (registers DiNAT with transformers' Auto classes)
from dinat import DinatBackbone, DinatConfig

DENSE = Path(__file__).parent / "fixtures" / "dense"


def backbone_of(model) -> DinatBackbone:
    """The DiNAT backbone inside a head (heads keep it under different names)."""
    backbones = [module for module in model.modules() if isinstance(module, DinatBackbone)]
    assert len(backbones) == 1, f"{type(model).__name__} holds {len(backbones)} DinatBackbones"
    return backbones[0]


def assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)


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
    fields = dict(embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 4, 8], kernel_size=3,
                  dilations=[[1], [1, 2], [1], [1]], mlp_ratio=2.0, drop_path_rate=0.0,
                  out_features=["stage1", "stage2", "stage3", "stage4"])
    return DinatConfig(**{**fields, **overrides})


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
    got = outputs_of(reloaded, inputs)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
