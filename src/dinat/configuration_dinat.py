"""DinatConfig: the fields, names and defaults of transformers' DiNAT config, validated, plus the paper's presets."""

from __future__ import annotations

import inspect
import json
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

from .config_validation import (ConfigFileError, ConfigValueError, read_json_object, validate_base_kwargs,
                                validate_dinat_fields, validate_size)
from .registry import PRESETS, get_variant

# Options transformers' DinatConfig does not have, and their defaults (save_pretrained writes them only when set).
_DINAT_ONLY_DEFAULTS = {"use_rpb": True, "na_backend": "auto"}

# Written by transformers' config but derived from other fields: accepted on load, recomputed here.
_DERIVED_KEYS = ("hidden_size", "num_layers", "stage_names")


class DinatConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of a DiNAT model, with the same fields and defaults as transformers' `DinatConfig`.

    The defaults describe DiNAT-mini
    ([shi-labs/dinat-mini-in1k-224](https://huggingface.co/shi-labs/dinat-mini-in1k-224)).
    `DinatConfig.from_preset("tiny")` builds the paper's other variants. Every layer of stage `i` has kernel `kernel_size` and dilation `dilations[i][j]`.
    Backbone outputs are chosen with `out_features` (names from `stage_names`: "stem", "stage1", ...) or
    `out_indices`.

    Args:
        patch_size: 4, the stem's total stride (two stride-2 convs); the only value checkpoints use.
        num_channels: channels of the input images.
        embed_dim: width of the stem and of stage 0; each later stage doubles it (`stage_widths`).
        depths: layers per stage.
        num_heads: attention heads per stage; each must divide its stage's width.
        kernel_size: odd neighborhood size K (K x K keys per query).
        dilations: one list per stage of one dilation per layer (default: DiNAT-mini's).
        mlp_ratio: MLP hidden width over the stage width.
        qkv_bias: whether the query, key and value projections have biases.
        hidden_dropout_prob: dropout after the embeddings and on the attention and MLP outputs.
        attention_probs_dropout_prob: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last layer; it grows linearly from 0 over all layers.
        hidden_act: the MLP's activation, a name in transformers' ACT2FN.
        initializer_range: standard deviation of the initial weights.
        layer_norm_eps: epsilon of the layer norms.
        layer_scale_init_value: initial layer scale of both residual branches (0: no layer scale).
        out_features: the backbone's outputs by name (from `stage_names`).
        out_indices: the same by index into `stage_names`.
        use_rpb: whether attention adds a relative positional bias (every released checkpoint does).
        na_backend: the neighborhood-attention backend, "auto" or one of `dinat.ops.BACKENDS`.
        **kwargs: transformers' PreTrainedConfig fields (num_labels, id2label, problem_type, ...).
    """

    model_type = "dinat"
    attribute_map = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}

    def __init__(
        self,
        patch_size: int = 4,
        num_channels: int = 3,
        embed_dim: int = 64,
        depths: list[int] = (3, 4, 6, 5),
        num_heads: list[int] = (2, 4, 8, 16),
        kernel_size: int = 7,
        dilations: list[list[int]] | None = None,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.1,
        hidden_act: str = "gelu",
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        layer_scale_init_value: float = 0.0,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        use_rpb: bool = True,
        na_backend: str = "auto",
        **kwargs,
    ):
        for key in _DERIVED_KEYS:
            kwargs.pop(key, None)
        if kwargs.pop("model_type", None) == "nat" and dilations is None and isinstance(depths, (list, tuple)):
            dilations = [[1] * depth for depth in depths]  # a NAT checkpoint: DiNAT without dilation
        validate_base_kwargs(kwargs)  # before transformers builds labels or looks up a dtype from them
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        if dilations is None:
            dilations = [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]
        self.dilations = dilations
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.layer_scale_init_value = layer_scale_init_value
        # not in transformers' DiNAT (absent from hub configs, so these defaults apply there):
        self.use_rpb = use_rpb  # False: no relative positional bias, for models trained from scratch
        self.na_backend = na_backend  # "auto", "torch", "cpp", "flex" or "natten"; see dinat.ops.dispatch
        self._validate()
        self.depths = list(self.depths)
        self.num_heads = list(self.num_heads)
        self.dilations = [list(stage) for stage in self.dilations]
        self.num_layers = len(self.depths)
        self.hidden_size = self.stage_widths[-1]
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        # transformers' BackboneConfigMixin keeps, checks and aligns out_features / out_indices (and serializes them)
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        try:
            super().__init__(**kwargs)
        except StrictDataclassError as err:  # transformers' type checks of its own fields (not a ValueError)
            field = getattr(err, "field", None) or "config"
            raise ConfigValueError(field, f"DinatConfig.{field}: {err}") from None
        validate_size(self)

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """Channels of each stage's features: `embed_dim` doubled by every downsampler before it."""
        return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

    # -- validation (all checks live in dinat.config_validation) ------------------------------------
    def _validate(self) -> None:
        validate_dinat_fields(self)

    # -- what save_pretrained writes ------------------------------------------------------------------
    def to_diff_dict(self) -> dict[str, Any]:
        """As transformers', minus this package's own options where they keep their defaults: such a config.json
        is one that plain transformers' DinatConfig writes and reads."""
        output = super().to_diff_dict()
        for key, default in _DINAT_ONLY_DEFAULTS.items():
            if key in output and output[key] == default:
                del output[key]
        return output

    # -- reading: every path names the field, and the file or argument it came from ---------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "DinatConfig":
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except ConfigFileError:
            raise  # already names the file
        except ValueError as err:
            field = getattr(err, "field", None)
            if field is not None and field in kwargs:
                raise ConfigValueError(field, f"DinatConfig.from_pretrained({str(pretrained_model_name_or_path)!r}, "
                                              f"{field}=...): {err}") from None
            raise ConfigValueError(field, f"{pretrained_model_name_or_path}: invalid DiNAT config.json: {err}") \
                from None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "DinatConfig":
        # transformers sets keyword arguments as attributes after construction, past any check; pass DiNAT's
        # own fields to the constructor instead, and check the result once more
        if not isinstance(config_dict, dict):
            raise ConfigFileError(f"a DiNAT config must be a JSON object of settings, got {type(config_dict).__name__}")
        own = {key: kwargs.pop(key) for key in list(kwargs) if key in _INIT_FIELDS}
        config_dict = dict(config_dict)
        for given, implied in (("out_features", "out_indices"), ("out_indices", "out_features")):
            if given in own and implied not in own:  # the file's choice of the other one no longer applies
                config_dict.pop(implied, None)
        config_dict.update(own)
        try:
            result = super().from_dict(config_dict, **kwargs)
        except StrictDataclassError as err:
            field = getattr(err, "field", None) or "config"
            raise ConfigValueError(field, f"DinatConfig.{field}: {err}") from None
        config = result[0] if isinstance(result, tuple) else result
        config._validate()
        return result

    @classmethod
    def from_json_file(cls, json_file) -> "DinatConfig":
        try:
            return super().from_json_file(json_file)
        except (ConfigFileError, json.JSONDecodeError):
            raise  # already name the file
        except ValueError as err:
            raise ConfigValueError(getattr(err, "field", None), f"{json_file}: invalid DiNAT config: {err}") from None

    @classmethod
    def _dict_from_json_file(cls, json_file) -> dict[str, Any]:
        return cls._decode_special_floats(read_json_object(json_file, "config.json"))

    # -- NAT checkpoints ------------------------------------------------------------------------------
    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return nat_to_dinat_dict(config_dict), kwargs

    # -- presets --------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DinatConfig":
        """The config of a registered variant (dinat.registry): mini, tiny, small, base, large, large-384,
        large-11x11-384, nat-mini, ... or its hub id; `overrides` replace its fields."""
        return cls(**get_variant(name).config_fields(**overrides))


def nat_to_dinat_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A NAT config (transformers' `model_type` "nat": the same blocks without dilation) as a DiNAT config dict."""
    if config_dict.get("model_type") != "nat":
        return config_dict
    config_dict = dict(config_dict, model_type="dinat")
    config_dict.setdefault("dilations", [[1] * depth for depth in config_dict.get("depths", (3, 4, 6, 5))])
    if config_dict.get("architectures"):
        config_dict["architectures"] = [name.replace("Nat", "Dinat", 1) if name.startswith("Nat") else name
                                        for name in config_dict["architectures"]]
    return config_dict


_INIT_FIELDS = frozenset(inspect.signature(DinatConfig.__init__).parameters) - {"self", "kwargs"}

__all__ = ["DinatConfig", "PRESETS"]
