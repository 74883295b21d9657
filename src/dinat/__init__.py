"""dinat: the Dilated Neighborhood Attention Transformer (DiNAT) for PyTorch, exact to the reference."""

from .auto import register_with_transformers
from .configuration_dinat import DinatConfig
from .image_processing_dinat import DinatImageProcessor
from .modeling_dinat import DinatBackbone, DinatForImageClassification, DinatModel, DinatPreTrainedModel
from .ops import na2d, na2d_av, na2d_qk
from .registry import PRESETS, VARIANTS, get_variant

__version__ = "0.1.0"

register_with_transformers()  # transformers' Auto classes and pipeline() now build these classes for "dinat"

__all__ = [
    "DinatConfig", "PRESETS", "VARIANTS", "get_variant", "DinatModel", "DinatForImageClassification", "DinatBackbone",
    "DinatPreTrainedModel", "DinatImageProcessor", "register_with_transformers", "na2d", "na2d_qk", "na2d_av",
]
