"""Validation of DiNAT configs and of the JSON files they are read from.

Every bad value becomes a `ConfigValueError` (a `ValueError`) whose message starts with the field's name, whatever
the path in: `DinatConfig(...)`, `config.json` through `from_pretrained` / `from_json_file`, or keyword arguments of
`from_pretrained`. The checks run before anything is built from a value, so a bad config never reaches torch (no
RuntimeError from deep inside a layer, no minutes spent building a billion labels).
"""

from __future__ import annotations

import json
import math
import os
from numbers import Integral, Real
from typing import Any

from .ops.dispatch import CHOICES as BACKEND_CHOICES

# Bounds on sizes, so that a typo in a config file cannot ask for unbounded time or memory.
MAX_NUM_LABELS = 1_000_000  # ImageNet-22k has 21,841 classes; a label dict this size already takes ~0.2 GB
MAX_PARAMETERS = 10_000_000_000  # 40 GB of float32 weights; DiNAT-large has 200M
MAX_LAYERS = 1024  # the paper's deepest model has 30
MAX_JSON_DEPTH = 100  # a DiNAT config.json nests 3 deep; Python's parser would recurse ~1000 deep and fail
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
_BOOL_FIELDS = ("qkv_bias", "use_rpb", "output_hidden_states", "output_attentions", "return_dict",
                "is_encoder_decoder", "tie_word_embeddings")


class ConfigValueError(ValueError):
    """A config field holds a bad value; `field` names it (None for a file that is not a config at all)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


def _fail(field: str, problem: str, value: Any) -> None:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise ConfigValueError(field.split("[")[0], f"DinatConfig.{field} {problem}, got {shown}")


def _check_int(field: str, value, low: int = 1, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        _fail(field, "must be an integer", value)
    if value < low or (high is not None and value > high):
        _fail(field, f"must be in [{low}, {high}]" if high is not None else f"must be >= {low}", value)


def _check_real(field: str, value, low: float, high: float | None = None, low_open: bool = False,
                high_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        _fail(field, "must be a number", value)
    if not math.isfinite(value):
        _fail(field, "must be finite", value)
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        _fail(field, f"must be in {left}{low}, {high if high is not None else 'inf'}{right}", value)


def _check_int_list(field: str, value) -> None:
    if not isinstance(value, (list, tuple)):
        _fail(field, "must be a list of integers (one per stage)", value)


def validate_dinat_fields(config) -> None:
    """Types, ranges and agreement of the DiNAT fields of `config` (already set as attributes)."""
    from transformers.activations import ACT2FN

    if isinstance(config.patch_size, bool) or config.patch_size != 4:
        _fail("patch_size", "must be 4 (the patch embedding is two stride-2 convs, and every released DiNAT "
                            "checkpoint uses 4)", config.patch_size)
    _check_int("num_channels", config.num_channels, 1, 1024)
    _check_int("embed_dim", config.embed_dim, 2)  # the stem's first conv has embed_dim // 2 channels
    _check_int("kernel_size", config.kernel_size, 3)
    if config.kernel_size % 2 == 0:
        _fail("kernel_size", "must be odd (a neighborhood is centred on its query)", config.kernel_size)

    _check_int_list("depths", config.depths)
    if not config.depths:
        _fail("depths", "must name at least one stage", config.depths)
    for i, depth in enumerate(config.depths):
        _check_int(f"depths[{i}]", depth, 1, MAX_LAYERS)
    if sum(config.depths) > MAX_LAYERS:
        _fail("depths", f"must add up to at most {MAX_LAYERS} layers", config.depths)
    _check_int_list("num_heads", config.num_heads)
    if len(config.num_heads) != len(config.depths):
        raise ConfigValueError("num_heads", f"DinatConfig.num_heads has {len(config.num_heads)} entries but depths "
                                            f"has {len(config.depths)}: give one head count per stage")
    if not isinstance(config.dilations, (list, tuple)) or \
            not all(isinstance(stage, (list, tuple)) for stage in config.dilations):
        _fail("dilations", "must be a list (one per stage) of lists of integers (one per layer)", config.dilations)
    if len(config.dilations) != len(config.depths):
        raise ConfigValueError("dilations", f"DinatConfig.dilations has {len(config.dilations)} stages but depths "
                                            f"has {len(config.depths)}: give one list of dilations per stage")
    for i, (depth, heads, stage_dilations) in enumerate(zip(config.depths, config.num_heads, config.dilations)):
        _check_int(f"num_heads[{i}]", heads, 1)
        if len(stage_dilations) != depth:
            raise ConfigValueError("dilations", f"DinatConfig.dilations[{i}] has {len(stage_dilations)} values but "
                                                f"depths[{i}] is {depth}: give one dilation per layer")
        for j, dilation in enumerate(stage_dilations):
            _check_int(f"dilations[{i}][{j}]", dilation, 1)
        width = config.stage_widths[i]
        if width % heads:
            raise ConfigValueError("num_heads", f"DinatConfig.num_heads[{i}] = {heads} does not divide stage {i}'s "
                                                f"width {width} (embed_dim * 2**{i})")

    _check_real("mlp_ratio", config.mlp_ratio, 0.0, low_open=True, high=None)
    if int(config.mlp_ratio * config.embed_dim) < 1:
        _fail("mlp_ratio", f"gives an MLP of width int(mlp_ratio * embed_dim) = 0 in stage 0; it must be at least "
                           f"1 / embed_dim = {1 / config.embed_dim:.4g}", config.mlp_ratio)
    for name in _BOOL_FIELDS:
        value = getattr(config, name, False)
        if not isinstance(value, bool):
            _fail(name, "must be True or False (JSON true / false, not a string or number)", value)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
        _check_real(name, getattr(config, name), 0.0, 1.0)
    hidden_act = config.hidden_act
    if isinstance(hidden_act, str):
        if hidden_act not in ACT2FN:
            _fail("hidden_act", "must name one of transformers' activations (transformers.activations.ACT2FN: "
                                "'gelu', 'relu', 'silu', 'gelu_new', ...)", hidden_act)
    elif not callable(hidden_act):
        _fail("hidden_act", "must be an activation name such as 'gelu'", hidden_act)
    _check_real("initializer_range", config.initializer_range, 0.0, low_open=True)
    _check_real("layer_norm_eps", config.layer_norm_eps, 0.0, low_open=True)
    _check_real("layer_scale_init_value", config.layer_scale_init_value, 0.0)
    if not isinstance(config.na_backend, str) or config.na_backend not in BACKEND_CHOICES:
        _fail("na_backend", f"must be one of {list(BACKEND_CHOICES)}", config.na_backend)


def validate_base_kwargs(kwargs: dict[str, Any]) -> None:
    """Fields of transformers' PreTrainedConfig that DiNAT uses, checked before transformers builds anything
    from them (it would build `num_labels` labels, or look `dtype` up on the torch module)."""
    num_labels = kwargs.get("num_labels")
    if num_labels is not None:
        _check_int("num_labels", num_labels, 0, MAX_NUM_LABELS)
    id2label = kwargs.get("id2label")
    if id2label is not None:
        if not isinstance(id2label, dict):
            _fail("id2label", "must be a mapping from class index to label", id2label)
        if len(id2label) > MAX_NUM_LABELS:
            _fail("id2label", f"must hold at most {MAX_NUM_LABELS} labels", f"{len(id2label)} labels")
        indices = []
        for key, label in id2label.items():
            try:
                index = int(key) if isinstance(key, (int, str)) and not isinstance(key, bool) else None
            except ValueError:
                index = None
            if index is None:
                _fail("id2label", "keys must be class indices (integers)", key)
            if not isinstance(label, str):
                _fail(f"id2label[{key!r}]", "must be a string", label)
            indices.append(index)
        if sorted(indices) != list(range(len(indices))):
            _fail("id2label", f"keys must be the class indices 0..{len(indices) - 1}, each once",
                  sorted(indices)[:10])
    label2id = kwargs.get("label2id")
    if label2id is not None and not isinstance(label2id, dict):
        _fail("label2id", "must be a mapping from label to class index", label2id)
    problem_type = kwargs.get("problem_type")
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        _fail("problem_type", f"must be one of {list(PROBLEM_TYPES)} or null", problem_type)
    for name in ("dtype", "torch_dtype"):
        value = kwargs.get(name)
        if value is None or value == "auto" and name == "dtype":
            continue
        import torch

        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        if value not in DTYPE_NAMES:
            _fail(name, f"must be one of {list(DTYPE_NAMES)}", value)
    for name in _BOOL_FIELDS:
        if name in kwargs and kwargs[name] is not None and not isinstance(kwargs[name], bool):
            _fail(name, "must be True or False (JSON true / false, not a string or number)", kwargs[name])


def estimated_parameters(config) -> int:
    """About how many parameters `config` builds (biases and norms included; exact to within a few percent)."""
    total = config.num_channels * 9 * (config.embed_dim // 2) + 9 * (config.embed_dim // 2) * config.embed_dim
    rpb_cells = (2 * config.kernel_size - 1) ** 2
    for i, (depth, heads, dim) in enumerate(zip(config.depths, config.num_heads, config.stage_widths)):
        hidden = int(config.mlp_ratio * dim)
        total += depth * (4 * dim * dim + 2 * dim * hidden + heads * rpb_cells + 9 * dim)
        if i < len(config.depths) - 1:
            total += 9 * dim * 2 * dim + 4 * dim
    return total + (config.stage_widths[-1] + 1) * (config.num_labels or 0)


def validate_size(config) -> None:
    params = estimated_parameters(config)
    if params > MAX_PARAMETERS:
        raise ConfigValueError(None, f"DinatConfig describes a model of about {params:.3g} parameters, more than the "
                                     f"limit of {MAX_PARAMETERS:.0e} (dinat.config_validation.MAX_PARAMETERS); "
                                     "check embed_dim, depths, mlp_ratio, kernel_size and num_labels")


# -------------------------------------------------------------------------------------------------
# JSON files
# -------------------------------------------------------------------------------------------------
class ConfigFileError(ValueError):
    """A JSON config file (config.json, preprocessor_config.json) that exists but is not a readable JSON object."""


def read_json_object(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """Read a JSON object from `path`, naming the file in every error: invalid JSON (json.JSONDecodeError, so
    transformers' loaders keep reporting it as they do), or a `ConfigFileError` for a file that is not UTF-8,
    nests deeper than MAX_JSON_DEPTH, or holds something other than an object."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as reader:
            raw = reader.read()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(f"{path}: corrupt {what}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    too_deep = ConfigFileError(f"{path}: corrupt {what}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise json.JSONDecodeError(f"{path}: corrupt {what}: invalid JSON ({err.msg})", err.doc, err.pos) from None
    except RecursionError:
        raise too_deep from None
    if _nesting(value) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise ConfigFileError(f"{path}: corrupt {what}: holds a JSON {kind}, not an object of settings")
    return value


def _nesting(value) -> int:
    """Depth of nested lists / dicts in a parsed JSON value (iterative: safe at any depth)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


__all__ = ["ConfigFileError", "ConfigValueError", "MAX_NUM_LABELS", "MAX_PARAMETERS", "read_json_object",
           "validate_base_kwargs", "validate_dinat_fields"]
