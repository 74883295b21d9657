"""Register this package's DiNAT with transformers' Auto classes for `model_type` "dinat".

transformers ships its own DiNAT, which needs the NATTEN package and, in 5.x, lays attention out wrongly.
`import dinat` calls `register_with_transformers()`, after which `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoBackbone` and `pipeline(...)` build this package's classes for DiNAT
checkpoints, and `AutoImageProcessor` builds `DinatImageProcessor` for processor configs that name it or name
no class (the hub DiNAT checkpoints name `ViTFeatureExtractor`, which transformers maps to its own ViT
processor: it computes the same pixels). Registration is idempotent and only affects this process.
"""

from __future__ import annotations

import importlib

_registered = False


def register_with_transformers() -> None:
    """Make transformers' Auto classes (and so `pipeline`) use this package's DiNAT classes."""
    global _registered
    if _registered:
        return
    from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    from .configuration_dinat import DinatConfig
    from .image_processing_dinat import DinatImageProcessor
    from .modeling_dinat import DinatBackbone, DinatForImageClassification, DinatModel

    # exist_ok: these replace transformers' own "dinat" entries; registered classes take precedence on lookup
    AutoConfig.register("dinat", DinatConfig, exist_ok=True)
    AutoModel.register(DinatConfig, DinatModel, exist_ok=True)
    AutoModelForImageClassification.register(DinatConfig, DinatForImageClassification, exist_ok=True)
    AutoBackbone.register(DinatConfig, DinatBackbone, exist_ok=True)
    # AutoImageProcessor.register would first load transformers' ViT processor (merging with the existing entry,
    # and warning about torchvision); registering in its mapping directly replaces the entry without that
    IMAGE_PROCESSOR_MAPPING.register(
        DinatConfig, {"pil": DinatImageProcessor, "torchvision": DinatImageProcessor}, exist_ok=True)
    # pipeline() resolves a checkpoint's `architectures` by name on the transformers module; left alone, that
    # imports transformers' own DiNAT modeling module, which fails with NATTEN >= 0.20 installed
    transformers_module = importlib.import_module("transformers")
    for cls in (DinatModel, DinatForImageClassification, DinatBackbone):
        setattr(transformers_module, cls.__name__, cls)
    _registered = True


__all__ = ["register_with_transformers"]
