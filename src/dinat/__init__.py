"""dinat: the Dilated Neighborhood Attention Transformer (DiNAT) for PyTorch, exact to the reference."""

from .configuration_dinat import PRESETS, DinatConfig
from .modeling_dinat import DinatBackbone, DinatForImageClassification, DinatModel, DinatPreTrainedModel
from .ops import na2d, na2d_av, na2d_qk

__version__ = "0.1.0"

__all__ = [
    "DinatConfig", "PRESETS", "DinatModel", "DinatForImageClassification", "DinatBackbone",
    "DinatPreTrainedModel", "na2d", "na2d_qk", "na2d_av",
]
