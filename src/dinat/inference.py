"""Image classification with a checkpoint: load the classifier and its processor, label image files.

`classify` runs transformers' registered "image-classification" pipeline; the images are decoded here first, by
the processor's own decoder, so that a bad file is named in the error and 16-bit images keep their range
(the pipeline's PIL conversion would clip them).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import pipeline

from .image_processing_dinat import DinatImageProcessor, decode_image
from .modeling_dinat import DinatForImageClassification
from .registry import variant_for_config

PROCESSOR_FILE = "preprocessor_config.json"


def load_classifier(model_name: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> DinatForImageClassification:
    """A DinatForImageClassification (hub id or folder) in eval mode on `device`; refused without a classifier."""
    model = DinatForImageClassification.from_pretrained(model_name, dtype=dtype)
    if not model.config.num_labels or model.config.num_labels < 1:
        raise ValueError(f"{model_name} has no classification head (num_labels = 0)")
    return model.to(device).eval()


def checkpoint_processor(model_name: str) -> DinatImageProcessor | None:
    """The checkpoint's own processor; None for a local folder without preprocessor_config.json.

    A file that is there but unreadable or corrupt is an error, never silently replaced by defaults (they could
    preprocess at the wrong size)."""
    if os.path.isdir(model_name) and not os.path.lexists(os.path.join(model_name, PROCESSOR_FILE)):
        return None
    try:
        return DinatImageProcessor.from_pretrained(model_name)
    except (OSError, ValueError) as err:
        found = _processor_file(model_name)
        if found is None:
            raise
        raise ValueError(f"{found}: cannot use this {PROCESSOR_FILE} (corrupt or unreadable; the defaults could "
                         f"preprocess at the wrong size): {err}") from None


def default_processor(config) -> DinatImageProcessor:
    """The evaluation transform of the registered variant with this architecture, else timm's ImageNet defaults."""
    variant = variant_for_config(config)
    return DinatImageProcessor.from_variant(variant.pretrained if variant else None)


def _processor_file(model_name: str) -> str | None:
    """The checkpoint's preprocessor_config.json (local, or in the hub cache) if it exists, else None."""
    if os.path.isdir(model_name):
        path = os.path.join(model_name, PROCESSOR_FILE)
        return path if os.path.lexists(path) else None
    try:
        found = try_to_load_from_cache(model_name, PROCESSOR_FILE)
    except Exception:  # noqa: BLE001 (not a valid hub id: there is no such file)
        return None
    return found if isinstance(found, str) else None


def classify(model: DinatForImageClassification, processor: DinatImageProcessor, images: list,
             top_k: int = 5, batch_size: int = 8) -> list[dict[str, Any]]:
    """Top-k labels per image (file paths, PIL images or arrays), as the image-classification pipeline gives them:
    [{"image", "predictions": [{"label", "score"}, ...]}, ...]. An image that cannot be read is named by its
    position ("image 3") and file."""
    classifier = pipeline("image-classification", model=model, image_processor=processor, device=model.device)
    if processor.input_size is None:  # the output size depends on the image: one at a time
        batch_size = 1
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        decoded = [decode_image(image, f"image {start + i + 1}") for i, image in enumerate(chunk)]
        predictions = classifier(decoded, top_k=top_k, batch_size=len(decoded))
        results.extend({"image": str(image), "predictions": rows} for image, rows in zip(chunk, predictions))
    return results


__all__ = ["checkpoint_processor", "classify", "default_processor", "load_classifier"]
