"""The DiNAT and NAT variants: each one's architecture and the metadata of its pretrained weights, in one table.

Laid out as timm's model registries are: a `PretrainedCfg` per variant (hub id, original checkpoint, number of
classes, input size, crop and interpolation of the evaluation transform, mean/std), beside the `DinatConfig`
fields of its architecture. `DinatConfig.from_preset`, `DinatImageProcessor.from_variant`, `dinat info` and
`dinat convert` read it; nothing else knows a variant's input size.

The architectures and checkpoints are those of the original repository (SHI-Labs/Neighborhood-Attention-Transformer,
`classification/dinat.py` and `nat.py`); the evaluation transform is its `validate.py`'s (timm's defaults: bicubic,
crop 0.875; the 384 fine-tunes evaluate uncropped, `crop_pct: 1.0` in `dinat_large_384.yml`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_DINAT_CHECKPOINTS = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/"
_NAT_CHECKPOINTS = "https://shi-labs.com/projects/nat/checkpoints/CLS/"


@dataclass(frozen=True)
class PretrainedCfg:
    """What the pretrained weights of a variant expect and where they live."""

    hub_id: str | None = None  # the Hugging Face checkpoint (transformers' layout)
    original_url: str | None = None  # the original repository's checkpoint (timm layout; `dinat convert` reads it)
    num_classes: int = 1000
    input_size: tuple[int, int] = (224, 224)  # (height, width) the weights were trained and evaluated at
    crop_pct: float = 0.875  # evaluation: resize the shorter side to size / crop_pct, then center crop
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    @property
    def original_file(self) -> str | None:
        """The original checkpoint's file name, as it is downloaded."""
        return self.original_url.rsplit("/", 1)[-1] if self.original_url else None


@dataclass(frozen=True)
class Variant:
    """A named architecture (the `DinatConfig` fields that differ from the defaults) and its pretrained weights."""

    name: str
    architecture: Mapping[str, Any]
    pretrained: PretrainedCfg

    def config_fields(self, **overrides) -> dict[str, Any]:
        """The keyword arguments of `DinatConfig` for this variant (a copy), with `overrides` applied."""
        fields = copy.deepcopy(dict(self.architecture))
        fields.update(overrides)
        return fields

    def matches(self, config: Any) -> bool:
        """Whether a config (DinatConfig or anything with its attributes) has this variant's architecture."""
        expected = {"kernel_size": 7, **self.architecture}  # the DinatConfig default
        expected.pop("drop_path_rate", None)  # a training setting: fine-tunes change it
        expected.pop("layer_scale_init_value", None)  # an initializer: the weights decide whether it is used
        for key, value in expected.items():
            actual = getattr(config, key, None)
            if key == "dilations":
                actual = [list(stage) for stage in actual or []]
            elif key in ("depths", "num_heads"):
                actual = list(actual or [])
            if actual != value:
                return False
        return True


# -- architectures -----------------------------------------------------------------------------------------------
_DILATIONS_224 = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
_DILATIONS_384 = [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]  # the 224 dilations scaled to the 384 maps
_DEEP = [3, 4, 18, 5]
_MINI = dict(depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2)
_TINY = dict(depths=_DEEP, num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2)
_SMALL = dict(depths=_DEEP, num_heads=[3, 6, 12, 24], embed_dim=96, mlp_ratio=2.0, drop_path_rate=0.3)
_BASE = dict(depths=_DEEP, num_heads=[4, 8, 16, 32], embed_dim=128, mlp_ratio=2.0, drop_path_rate=0.5)
_LARGE = dict(depths=_DEEP, num_heads=[6, 12, 24, 48], embed_dim=192, mlp_ratio=2.0, drop_path_rate=0.35)


def _no_dilation(depths: list[int]) -> list[list[int]]:
    return [[1] * depth for depth in depths]


def _dinat(file: str, hub_name: str, **data) -> PretrainedCfg:
    return PretrainedCfg(hub_id=f"shi-labs/{hub_name}", original_url=_DINAT_CHECKPOINTS + file, **data)


def _nat(file: str, hub_name: str) -> PretrainedCfg:
    return PretrainedCfg(hub_id=f"shi-labs/{hub_name}", original_url=_NAT_CHECKPOINTS + file)


_AT_384 = dict(input_size=(384, 384), crop_pct=1.0)

_VARIANTS = [
    Variant("mini", dict(_MINI, dilations=[[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5]),
            _dinat("dinat_mini_in1k_224.pth", "dinat-mini-in1k-224")),
    Variant("tiny", dict(_TINY, dilations=_DILATIONS_224), _dinat("dinat_tiny_in1k_224.pth", "dinat-tiny-in1k-224")),
    Variant("small", dict(_SMALL, dilations=_DILATIONS_224),
            _dinat("dinat_small_in1k_224.pth", "dinat-small-in1k-224")),
    Variant("base", dict(_BASE, layer_scale_init_value=1e-5, dilations=_DILATIONS_224),
            _dinat("dinat_base_in1k_224.pth", "dinat-base-in1k-224")),
    Variant("large", dict(_LARGE, dilations=_DILATIONS_224),
            _dinat("dinat_large_in22k_in1k_224.pth", "dinat-large-in22k-in1k-224")),
    Variant("large-384", dict(_LARGE, dilations=_DILATIONS_384),
            _dinat("dinat_large_in22k_in1k_384.pth", "dinat-large-in22k-in1k-384", **_AT_384)),
    Variant("large-11x11-384", dict(_LARGE, kernel_size=11, dilations=_DILATIONS_224),
            _dinat("dinat_large_in22k_in1k_384_11x11.pth", "dinat-large-11x11-in22k-in1k-384", **_AT_384)),
    # NAT: the same blocks without dilation (transformers' model_type "nat"; its checkpoints load as DiNAT)
    Variant("nat-mini", dict(_MINI, dilations=_no_dilation(_MINI["depths"])),
            _nat("nat_mini.pth", "nat-mini-in1k-224")),
    Variant("nat-tiny", dict(_TINY, dilations=_no_dilation(_DEEP)), _nat("nat_tiny.pth", "nat-tiny-in1k-224")),
    Variant("nat-small", dict(_SMALL, layer_scale_init_value=1e-5, dilations=_no_dilation(_DEEP)),
            _nat("nat_small.pth", "nat-small-in1k-224")),
    Variant("nat-base", dict(_BASE, layer_scale_init_value=1e-5, dilations=_no_dilation(_DEEP)),
            _nat("nat_base.pth", "nat-base-in1k-224")),
]

VARIANTS: Mapping[str, Variant] = MappingProxyType({variant.name: variant for variant in _VARIANTS})

# name -> DinatConfig fields, the form `DinatConfig.from_preset` and the benchmarks take
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: variant.architecture for name, variant in VARIANTS.items()})

# the data config of a model no variant describes (a custom architecture): timm's ImageNet defaults
DEFAULT_PRETRAINED_CFG = PretrainedCfg()


# -- lookups -------------------------------------------------------------------------------------------------------
def get_variant(name: str) -> Variant:
    """The variant named `name` (a preset name such as "mini", or its hub id); ValueError listing the names if none."""
    found = find_variant(name)
    if found is None:
        raise ValueError(f"unknown DiNAT preset {name!r}; choose one of {sorted(VARIANTS)} (or their hub ids)")
    return found


def find_variant(name: str) -> Variant | None:
    """The variant with this preset name or hub id, else None."""
    if name in VARIANTS:
        return VARIANTS[name]
    return next((v for v in VARIANTS.values() if v.pretrained.hub_id == name), None)


def variant_for_config(config: Any) -> Variant | None:
    """The variant whose architecture `config` has (the dilations tell the 224 and 384 ones apart), else None."""
    return next((v for v in VARIANTS.values() if v.matches(config)), None)


def variant_for_original_file(file_name: str) -> Variant | None:
    """The variant whose original checkpoint is named `file_name` (as downloaded), else None."""
    return next((v for v in VARIANTS.values() if v.pretrained.original_file == file_name), None)


__all__ = ["DEFAULT_PRETRAINED_CFG", "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "PRESETS", "PretrainedCfg",
           "VARIANTS", "Variant", "find_variant", "get_variant", "variant_for_config", "variant_for_original_file"]
