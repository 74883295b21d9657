"""DiNAT: Dilated Neighborhood Attention Transformer (Hassani & Shi, arXiv 2209.15001).

Reads top to bottom: patch embedding -> four stages of neighborhood-attention layers, each stage but the
last ending in a strided-conv downsampler -> final norm -> pooled features -> classifier head.
Module and parameter names match transformers' DiNAT, so hub checkpoints load as they are.
Feature maps are channels-last, (batch, height, width, channels), between modules.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Unpack

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple

from . import atomic, ops
from .configuration_dinat import DinatConfig
from .loading import checked_from_pretrained
from .ops.plan import needs_grad


# -------------------------------------------------------------------------------------------------
# Outputs
# -------------------------------------------------------------------------------------------------
@dataclass
class DinatEncoderOutput(ModelOutput):
    """What the encoder (the four stages) returns.

    Attributes:
        last_hidden_state: (B, h, w, C_last) output of the last stage.
        hidden_states: with output_hidden_states, the embeddings' (B, H/4, W/4, C) then each stage's output
            (B, h, w, C_i), channels-last.
        attentions: with output_attentions, each stage's last layer's weights (B, heads, h, w, K*K), keys in
            row-major window order.
        reshaped_hidden_states: `hidden_states` as (B, C, h, w).
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class DinatModelOutput(ModelOutput):
    """What DinatModel returns.

    Attributes:
        last_hidden_state: (B, ceil(H/32), ceil(W/32), C_last) after the final norm.
        pooler_output: (B, C_last) mean of last_hidden_state over positions (None without the pooling layer).
        hidden_states, attentions, reshaped_hidden_states: as in DinatEncoderOutput.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class DinatImageClassifierOutput(ModelOutput):
    """What DinatForImageClassification returns.

    Attributes:
        loss: scalar loss when labels were given.
        logits: (B, num_labels).
        hidden_states, attentions, reshaped_hidden_states: as in DinatEncoderOutput.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.Tensor, ...] | None = None


# -------------------------------------------------------------------------------------------------
# Embeddings and downsampling
# -------------------------------------------------------------------------------------------------
class DinatLayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and keys) over the last dimension, on the C++ row kernel for CPU inference."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(hidden_states)
        return ops.layer_norm(hidden_states, self.weight, self.bias, self.eps)


class DinatPatchEmbeddings(nn.Module):
    """Two stride-2 3x3 convs: (B, 3, H, W) -> (B, H/4, W/4, embed_dim) (sizes rounded up)."""

    def __init__(self, config: DinatConfig):
        super().__init__()
        self.projection = nn.Sequential(
            nn.Conv2d(config.num_channels, config.embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(config.embed_dim // 2, config.embed_dim, kernel_size=3, stride=2, padding=1),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # channels-last pixels: both convs run channels-last (several times faster for the 3-channel one on CPU),
        # and the result, permuted to (B, H, W, C), is contiguous without a copy
        hidden_states = pixel_values.contiguous(memory_format=torch.channels_last)
        for conv in self.projection:
            hidden_states = ops.bfloat16.conv2d(conv, hidden_states)
        return hidden_states.permute(0, 2, 3, 1)


class DinatEmbeddings(nn.Module):
    """Checked pixels (B, num_channels, H, W) -> normalized patch embeddings (B, H/4, W/4, embed_dim)."""

    def __init__(self, config: DinatConfig):
        super().__init__()
        self.patch_embeddings = DinatPatchEmbeddings(config)
        self.norm = DinatLayerNorm(config.embed_dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        first_conv = self.patch_embeddings.projection[0]
        check_pixel_values(pixel_values, first_conv.in_channels)
        pixel_values = pixel_values.to(first_conv.weight.dtype)  # float32 images into a half-precision model
        return self.dropout(self.norm(self.patch_embeddings(pixel_values)))


class DinatDownsampler(nn.Module):
    """Stride-2 3x3 conv doubling the width: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = DinatLayerNorm(2 * dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = ops.bfloat16.conv2d(self.reduction, hidden_states.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.norm(hidden_states)


# -------------------------------------------------------------------------------------------------
# Neighborhood attention
# -------------------------------------------------------------------------------------------------
class NeighborhoodAttention(nn.Module):
    """Multi-head (dilated) neighborhood attention with relative positional bias (rpb, unless use_rpb=False).

    Channels-last in and out: (B, H, W, dim) -> (B, H, W, dim), plus the attention weights
    (B, num_heads, H, W, kernel_size ** 2) when asked for (else None). The map must be at least
    kernel_size * dilation on each axis (DinatLayer pads smaller ones).
    """

    def __init__(self, config: DinatConfig, dim: int, num_heads: int, kernel_size: int, dilation: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.backend = config.na_backend
        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.key = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.value = nn.Linear(dim, dim, bias=config.qkv_bias)
        if config.use_rpb:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        else:
            self.register_parameter("rpb", None)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _queries_keys_values(self, hidden_states: torch.Tensor):
        """q, k, v as (B, heads, H, W, head_dim) views, and the packed (B, H, W, 3, heads, head_dim) projection they
        view, or None.

        Where autograd records, q, k and v are one matmul on the joined weights (joined per call, so that gradients
        reach the three parameters), and the attention's gradient comes back packed. Elsewhere each is its own
        matmul on its own weight, nothing joined and nothing cached: a weight changed in place through `.data`
        (EMA updates, weight surgery) bumps no version counter, and a cached join would keep answering with the old
        weights. Three matmuls of N = dim cost a little more than one of N = 3 * dim (docs/performance.md)."""
        batch, height, width, _ = hidden_states.shape
        layers = (self.query, self.key, self.value)
        if not needs_grad(hidden_states, *(t for layer in layers for t in (layer.weight, layer.bias))):
            shape = (batch, height, width, self.num_heads, self.head_dim)
            q, k, v = (ops.linear(hidden_states, layer.weight, layer.bias).view(shape).permute(0, 3, 1, 2, 4)
                       for layer in layers)
            return q, k, v, None
        weight = torch.cat([layer.weight for layer in layers])
        bias = None if self.query.bias is None else torch.cat([layer.bias for layer in layers])
        qkv = ops.linear(hidden_states, weight, bias).view(batch, height, width, 3, self.num_heads, self.head_dim)
        return *qkv.permute(3, 0, 4, 1, 2, 5).unbind(0), qkv

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        batch, height, width, channels = hidden_states.shape
        q, k, v, qkv = self._queries_keys_values(hidden_states)
        scale = 1.0 / math.sqrt(self.head_dim)

        weights = None
        if output_attentions or (self.training and self.dropout.p > 0):
            # unfused: the (B, heads, H, W, K*K) weights are returned or dropped out
            scores = ops.na2d_qk(q * scale, k, self.kernel_size, self.dilation, rpb=self.rpb)
            weights = self.dropout(scores.softmax(dim=-1))
            context = ops.na2d_av(weights, v, self.kernel_size, self.dilation)
        elif qkv is not None:
            context = ops.na2d_packed(qkv, self.kernel_size, self.dilation, rpb=self.rpb, scale=scale,
                                      backend=self.backend)
        else:
            context = ops.na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=scale,
                               backend=self.backend)

        # the torch and cpp backends return a heads-first view of (B, H, W, heads, D) memory: this reshape is free
        context = context.permute(0, 2, 3, 1, 4).reshape(batch, height, width, channels)
        return context, (weights if output_attentions else None)


class NeighborhoodAttentionOutput(nn.Module):
    def __init__(self, config: DinatConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """dropout(dense(x)), plus `residual` if given (then added inside the matmul where nothing is dropped)."""
        return _dense_dropout_residual(self.dense, self.dropout, hidden_states, residual)


class NeighborhoodAttentionModule(nn.Module):
    def __init__(self, config: DinatConfig, dim: int, num_heads: int, kernel_size: int, dilation: int):
        super().__init__()
        self.self = NeighborhoodAttention(config, dim, num_heads, kernel_size, dilation)
        self.output = NeighborhoodAttentionOutput(config, dim)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False,
                residual: torch.Tensor | None = None):
        context, weights = self.self(hidden_states, output_attentions)
        return self.output(context, residual), weights


# -------------------------------------------------------------------------------------------------
# MLP, drop path, layer
# -------------------------------------------------------------------------------------------------
class DinatIntermediate(nn.Module):
    def __init__(self, config: DinatConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, int(config.mlp_ratio * dim))
        self.intermediate_act_fn = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if getattr(self.intermediate_act_fn, "act", None) is F.gelu:  # transformers' "gelu": fused into the matmul
            return ops.linear(hidden_states, self.dense.weight, self.dense.bias, gelu=True)
        return self.intermediate_act_fn(self.dense(hidden_states))


class DinatOutput(nn.Module):
    def __init__(self, config: DinatConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(int(config.mlp_ratio * dim), dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """dropout(dense(x)), plus `residual` if given (then added inside the matmul where nothing is dropped)."""
        return _dense_dropout_residual(self.dense, self.dropout, hidden_states, residual)


def _dense_dropout_residual(dense: nn.Linear, dropout: nn.Dropout, hidden_states: torch.Tensor,
                            residual: torch.Tensor | None) -> torch.Tensor:
    if residual is not None and not (dropout.training and dropout.p > 0):
        return ops.linear(hidden_states, dense.weight, dense.bias, residual=residual)
    out = dropout(dense(hidden_states))
    return out if residual is None else residual + out


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples' residual branch with probability drop_prob, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    # the rescale goes into the per-sample mask: one pass over x instead of two
    scale = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob).div_(keep_prob)
    return x * scale


class DinatDropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return drop_path(hidden_states, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class DinatLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + NA(LN(x)), then x + MLP(LN(x)); optional layer scale on both branches.

    A GradientCheckpointingLayer: transformers' activation-checkpointing switches recompute it in backward."""

    def __init__(self, config: DinatConfig, dim: int, num_heads: int, dilation: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.window_size = config.kernel_size * dilation
        self.layernorm_before = DinatLayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = NeighborhoodAttentionModule(config, dim, num_heads, config.kernel_size, dilation)
        self.drop_path = DinatDropPath(drop_path_rate)
        self.layernorm_after = DinatLayerNorm(dim, eps=config.layer_norm_eps)
        self.intermediate = DinatIntermediate(config, dim)
        self.output = DinatOutput(config, dim)
        self.layer_scale_parameters = (
            nn.Parameter(config.layer_scale_init_value * torch.ones((2, dim)))
            if config.layer_scale_init_value > 0 else None
        )

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        batch, height, width, _ = hidden_states.shape
        shortcut = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        # a map smaller than the dilated window is zero-padded at the bottom/right, as the reference does;
        # padded tokens are not masked (their keys/values are the projection biases)
        pad_h, pad_w = max(0, self.window_size - height), max(0, self.window_size - width)
        if pad_h or pad_w:
            hidden_states = F.pad(hidden_states, (0, 0, 0, pad_w, 0, pad_h))
        # without layer scale, drop path or padding, each residual add runs inside its branch's last matmul
        fuse_residual = self.layer_scale_parameters is None and not (self.drop_path.training and
                                                                     self.drop_path.drop_prob > 0)
        if fuse_residual and not (pad_h or pad_w):
            hidden_states, weights = self.attention(hidden_states, output_attentions, residual=shortcut)
        else:
            attention_output, weights = self.attention(hidden_states, output_attentions)
            if pad_h or pad_w:
                attention_output = attention_output[:, :height, :width, :].contiguous()
            if self.layer_scale_parameters is not None:
                attention_output = self.layer_scale_parameters[0] * attention_output
            hidden_states = shortcut + self.drop_path(attention_output)

        mlp_input = self.intermediate(self.layernorm_after(hidden_states))
        if fuse_residual:
            return self.output(mlp_input, residual=hidden_states), weights
        mlp_output = self.output(mlp_input)
        if self.layer_scale_parameters is not None:
            mlp_output = self.layer_scale_parameters[1] * mlp_output
        return hidden_states + self.drop_path(mlp_output), weights


# -------------------------------------------------------------------------------------------------
# Stages and encoder
# -------------------------------------------------------------------------------------------------
class DinatStage(nn.Module):
    def __init__(self, config: DinatConfig, dim: int, depth: int, num_heads: int, dilations: list[int],
                 drop_path_rate: list[float], downsample: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            DinatLayer(config, dim, num_heads, dilations[i], drop_path_rate[i]) for i in range(depth))
        self.downsample = DinatDownsampler(dim) if downsample else None

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        """Returns (output, output before downsampling, weights of the last layer or None)."""
        weights = None
        for layer in self.layers:
            # hidden_states positional: a checkpointed layer passes it through the checkpoint function
            hidden_states, weights = layer(hidden_states, output_attentions=output_attentions)
        before_downsampling = hidden_states
        if self.downsample is not None:
            hidden_states = self.downsample(before_downsampling)
        return hidden_states, before_downsampling, weights


class DinatEncoder(nn.Module):
    def __init__(self, config: DinatConfig):
        super().__init__()
        num_stages = len(config.depths)
        # drop path grows linearly over all layers of all stages
        rates = [x.item() for x in torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu")]
        self.levels = nn.ModuleList(
            DinatStage(
                config,
                dim=config.stage_widths[i],
                depth=config.depths[i],
                num_heads=config.num_heads[i],
                dilations=config.dilations[i],
                drop_path_rate=rates[sum(config.depths[:i]):sum(config.depths[:i + 1])],
                downsample=i < num_stages - 1,
            )
            for i in range(num_stages)
        )

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False,
                output_hidden_states: bool = False,
                output_hidden_states_before_downsampling: bool = False) -> DinatEncoderOutput:
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_reshaped = (hidden_states.permute(0, 3, 1, 2),) if output_hidden_states else None
        all_attentions = () if output_attentions else None

        for stage in self.levels:
            hidden_states, before_downsampling, weights = stage(hidden_states, output_attentions)
            if output_hidden_states:
                kept = before_downsampling if output_hidden_states_before_downsampling else hidden_states
                all_hidden += (kept,)
                all_reshaped += (kept.permute(0, 3, 1, 2),)
            if output_attentions:
                all_attentions += (weights,)

        return DinatEncoderOutput(last_hidden_state=hidden_states, hidden_states=all_hidden,
                                  attentions=all_attentions, reshaped_hidden_states=all_reshaped)


# -------------------------------------------------------------------------------------------------
# Pretrained-model plumbing (init, from_pretrained / save_pretrained come from transformers)
# -------------------------------------------------------------------------------------------------
def check_pixel_values(pixel_values: torch.Tensor, num_channels: int) -> None:
    """Raise a ValueError that says what was expected, before torch fails deep inside a conv."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor of shape (batch, {num_channels}, height, width), "
                         f"got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be 4-D (batch, {num_channels}, height, width), "
                         f"got shape {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a floating-point tensor (normalized images), got {pixel_values.dtype}; "
                         "use DinatImageProcessor or convert with .float()")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch (batch size 0)")
    if pixel_values.shape[1] != num_channels:
        raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels but the model expects {num_channels} "
                         f"(config.num_channels); expected shape (batch, {num_channels}, height, width), "
                         f"got {tuple(pixel_values.shape)}")
    if pixel_values.shape[2] == 0 or pixel_values.shape[3] == 0:
        raise ValueError(f"pixel_values has an empty image: shape {tuple(pixel_values.shape)}")


# What transformers may pass to any model's forward (its TransformersKwargs): the Trainer's num_items_in_batch,
# the output flags, and the attention/position keywords that composite models hand on to their submodules.
# DiNAT reads the output flags and has no use for the rest; any other keyword is a caller's mistake.
TRANSFORMERS_FORWARD_KWARGS = TransformersKwargs.__required_keys__ | TransformersKwargs.__optional_keys__


def check_forward_kwargs(model: nn.Module, kwargs: dict) -> None:
    """Raise a TypeError naming the first keyword argument of `model.forward` that transformers would not pass
    (a typo such as `label=` for `labels=` would otherwise be silently ignored)."""
    unknown = [name for name in kwargs if name not in TRANSFORMERS_FORWARD_KWARGS]
    if not unknown:
        return
    named = [name for name in inspect.signature(model.forward).parameters if name != "kwargs"] + ["return_dict"]
    close = difflib.get_close_matches(unknown[0], named, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(named)}"
    raise TypeError(f"{type(model).__name__}.forward() got an unexpected keyword argument {unknown[0]!r}{hint}")


NAT_KEY_MAPPING = {r"^nat\.": "dinat."}  # transformers' NAT keeps the trunk under `nat.`, DiNAT under `dinat.`


class DinatPreTrainedModel(PreTrainedModel):
    """Weight initialization, checked `from_pretrained`, atomic `save_pretrained` and gradient checkpointing for
    every DiNAT model; the rest (hub, cache, dtype, device) is transformers' PreTrainedModel."""

    config_class = DinatConfig
    config: DinatConfig
    base_model_prefix = "dinat"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DinatLayer"]
    # No DiNAT loss consumes `num_items_in_batch`: each is a mean over its batch. This tells transformers'
    # Trainer so, which then divides by the accumulation steps itself and does not scale by the world size.
    accepts_loss_kwargs = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' from_pretrained (folders, hub ids, cache, revision, offline), with clear errors for
        corrupt files, unsafe pickles, missing/unexpected keys and shape mismatches (see dinat.loading), for
        checkpoints that cannot be found (see dinat.hub), and NAT checkpoints (trunk under `nat.`) loaded as DiNAT.

        Args:
            pretrained_model_name_or_path: a checkpoint folder or a hub id (e.g. "shi-labs/dinat-mini-in1k-224").
            *model_args: passed to the model's constructor, as in transformers.
            **kwargs: transformers' keywords (revision, cache_dir, dtype, device_map, num_labels,
                ignore_mismatched_sizes, output_loading_info, ...), plus `strict=False`, which turns missing or
                unexpected keys into transformers' warnings.

        Returns:
            The model in eval mode, or (model, loading_info) with output_loading_info=True.

        Raises:
            CheckpointFileError: a corrupt, truncated or unsafe weights file.
            CheckpointMismatchError: missing/unexpected keys or shape mismatches.
            MissingHeadError: a classifier whose head is not in the checkpoint, no new head asked for.
        """
        from .hub import clear_loading_errors

        # DiNAT checkpoints have no `nat.` keys, so this renaming only ever touches NAT checkpoints
        kwargs["key_mapping"] = {**NAT_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        # a local folder is read under a shared lock: a concurrent save_pretrained never mixes into it
        with clear_loading_errors(pretrained_model_name_or_path, "model"), atomic.reading(
                pretrained_model_name_or_path, kwargs.get("subfolder")):
            loaded = checked_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, model_args,
                                             kwargs)
        # transformers re-applies the renamings it used when saving; a loaded NAT checkpoint saves as DiNAT
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions
                                         if list(getattr(c, "source_patterns", ())) != list(NAT_KEY_MAPPING)]
        return loaded

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, push_to_hub: bool = False,
                        **kwargs) -> None:
        """transformers' save_pretrained, written atomically (see dinat.atomic): the folder holds the old or the
        new checkpoint at every instant, old weight files never survive (sharded over unsharded and back), other
        files in it (preprocessor_config.json, README.md, ...) are kept.

        Args:
            save_directory: the checkpoint folder (created if needed).
            *args, **kwargs: transformers' (max_shard_size, safe_serialization, ...).
            is_main_process: False writes nothing (the other processes of a distributed run).
            push_to_hub: upload through transformers' own path.

        Raises:
            UnsafeTargetError: `save_directory` is a file, or the working directory or a folder holding it.
        """
        if not is_main_process or push_to_hub:  # nothing written here / transformers' upload path, unchanged
            return super().save_pretrained(save_directory, *args, is_main_process=is_main_process,
                                           push_to_hub=push_to_hub, **kwargs)
        with atomic.replace_checkpoint(save_directory, owns=atomic.model_owns) as staging:
            super().save_pretrained(staging, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, NeighborhoodAttention) and module.rpb is not None:
            init.trunc_normal_(module.rpb, std=std)  # as the original NAT/DiNAT code
        elif isinstance(module, DinatLayer) and module.layer_scale_parameters is not None:
            init.constant_(module.layer_scale_parameters, self.config.layer_scale_init_value)

    def _set_gradient_checkpointing(self, enable: bool = True,
                                    gradient_checkpointing_func=torch.utils.checkpoint.checkpoint,
                                    every_n_layers: int = 1) -> None:
        """transformers' switch (it counts DinatLayers over all stages), with a clear error for a bad
        `every_n_layers` instead of a ZeroDivisionError."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)

    def set_grad_checkpointing(self, enable: bool = True, stages: list[int] | None = None) -> None:
        """timm-style activation-checkpointing switch (recompute layers in backward to save memory).

        Args:
            enable: turn checkpointing on or off.
            stages: stage indices to switch (default: all); every layer of each.

        Raises:
            ValueError: a stage index out of range.
        """
        all_stages = self._stages()
        if stages is not None:
            bad = [i for i in stages if not isinstance(i, int) or not 0 <= i < len(all_stages)]
            if bad:
                raise ValueError(f"stages {bad} out of range: the model has stages 0 .. {len(all_stages) - 1}")
        for i, stage in enumerate(all_stages):
            if stages is None or i in stages:
                for layer in stage.layers:
                    layer.gradient_checkpointing = enable
                    layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint,
                                                                           use_reentrant=False)

    def _stages(self) -> list[DinatStage]:
        return [m for m in self.modules() if isinstance(m, DinatStage)]

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters weight decay should leave alone (decaying them only hurts): biases and norm
        weights (the 1-D parameters), relative positional biases and layer scales. The timm convention, which
        timm's optimizer factory reads."""
        return {name for name, param in self.named_parameters()
                if param.ndim <= 1 or name.endswith((".rpb", ".layer_scale_parameters"))}

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups of the trainable parameters: with `weight_decay`, and without (`no_weight_decay`)."""
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        exempt = self.no_weight_decay()
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if name in exempt else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resolve(value, default):
    return default if value is None else value


class DinatModel(DinatPreTrainedModel):
    """The DiNAT trunk: pixels to the last stage's normalized features and their mean over positions.

    Args:
        config: the architecture.
        add_pooling_layer: whether `forward` returns `pooler_output` (the mean of `last_hidden_state` over
            positions; it has no parameters).
    """

    def __init__(self, config: DinatConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.num_features = config.stage_widths[-1]
        self.embeddings = DinatEmbeddings(config)
        self.encoder = DinatEncoder(config)
        self.layernorm = DinatLayerNorm(self.num_features, eps=config.layer_norm_eps)
        self.add_pooling_layer = add_pooling_layer
        self.post_init()

    def get_input_embeddings(self) -> DinatPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs: Unpack[TransformersKwargs]) -> DinatModelOutput:
        """Run the trunk.

        Args:
            pixel_values: (B, num_channels, H, W) normalized images, any H and W.
            output_attentions: also return each stage's last attention weights (default: the config's).
            output_hidden_states: also return every stage's features (default: the config's).
            return_dict: False returns a tuple of the output's non-None fields (default: the config's).
            **kwargs: transformers' forward keywords (`TransformersKwargs`), accepted and unused; any other
                keyword raises a TypeError.

        Returns:
            DinatModelOutput: `last_hidden_state` (B, ceil(H/32), ceil(W/32), C_last) after the final norm,
            `pooler_output` (B, C_last) or None, and `hidden_states` / `reshaped_hidden_states` / `attentions`
            when asked for (see DinatEncoderOutput).
        """
        check_forward_kwargs(self, kwargs)
        output_attentions = _resolve(output_attentions, self.config.output_attentions)
        output_hidden_states = _resolve(output_hidden_states, self.config.output_hidden_states)
        embedding_output = self.embeddings(pixel_values)  # (B, H/4, W/4, C)
        encoder_outputs = self.encoder(embedding_output, output_attentions=output_attentions,
                                       output_hidden_states=output_hidden_states)
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)  # (B, H/32, W/32, C_last)
        return DinatModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=mean_over_positions(sequence_output) if self.add_pooling_layer else None,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
            reshaped_hidden_states=encoder_outputs.reshaped_hidden_states,
        )


def mean_over_positions(features: torch.Tensor) -> torch.Tensor:
    """(B, h, w, C) channels-last features -> (B, C): the pooling of every DiNAT head."""
    return features.mean(dim=(1, 2))


class DinatForImageClassification(DinatPreTrainedModel):
    """DiNAT with a linear head on the mean of the last stage's features.

    Args:
        config: the architecture; `config.num_labels` classes (0: no head, `logits` are the pooled features),
            `config.problem_type` chooses the loss.
    """

    def __init__(self, config: DinatConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dinat = DinatModel(config)
        self.classifier = (nn.Linear(self.dinat.num_features, config.num_labels)
                           if config.num_labels > 0 else nn.Identity())
        self.post_init()

    # timm-style entry points
    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalized last-stage features (B, H/32, W/32, C_last)."""
        return self.dinat(pixel_values, return_dict=True).last_hidden_state

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, h, w, C_last) features -> logits (B, num_labels), or the pooled features if pre_logits."""
        pooled = mean_over_positions(features)
        return pooled if pre_logits else self.classifier(pooled)

    def reset_classifier(self, num_labels: int, id2label: dict[int, str] | None = None) -> None:
        """Replace the head with a freshly initialized one (the config follows).

        Args:
            num_labels: classes of the new head (0: no head, the logits are the pooled features).
            id2label: names of the new classes, by index.
        """
        self.num_labels = num_labels
        self.config.num_labels = num_labels
        if id2label is not None:
            self.config.id2label = {int(k): v for k, v in id2label.items()}
            self.config.label2id = {v: int(k) for k, v in id2label.items()}
        param = self.dinat.layernorm.weight
        self.classifier = (nn.Linear(self.dinat.num_features, num_labels, device=param.device, dtype=param.dtype)
                           if num_labels > 0 else nn.Identity())
        if num_labels > 0:
            nn.init.normal_(self.classifier.weight, std=self.config.initializer_range)
            nn.init.zeros_(self.classifier.bias)

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> DinatImageClassifierOutput:
        """Classify images, and compute the loss when labels are given.

        Args:
            pixel_values: (B, num_channels, H, W) normalized images, any H and W.
            labels: (B,) class indices in [0, num_labels) for single-label classification, (B, num_labels)
                floats for multi-label, (B,) or (B, 1) floats for regression (num_labels == 1); the loss
                follows `config.problem_type`, inferred from num_labels and the labels' dtype when unset.
            output_attentions: also return each stage's last attention weights (default: the config's).
            output_hidden_states: also return every stage's features (default: the config's).
            return_dict: False returns a tuple of the output's non-None fields (default: the config's).
            **kwargs: transformers' forward keywords (`TransformersKwargs`, e.g. the Trainer's
                `num_items_in_batch`), accepted and unused: each loss is a mean over its batch. Any other
                keyword raises a TypeError.

        Returns:
            DinatImageClassifierOutput: `logits` (B, num_labels), `loss` (a scalar) when labels are given,
            and `hidden_states` / `reshaped_hidden_states` / `attentions` when asked for.
        """
        check_forward_kwargs(self, kwargs)
        outputs = self.dinat(pixel_values, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            # transformers' image-classification loss (by config.problem_type, inferred when unset)
            loss = self.loss_function(self._checked_labels(labels, logits), logits, self.config)
        return DinatImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                          attentions=outputs.attentions,
                                          reshaped_hidden_states=outputs.reshaped_hidden_states)

    def _checked_labels(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Labels as the loss needs them, or a clear error: class indices in range for single-label
        classification, the logits' dtype for regression and multi-label targets."""
        labels = labels.to(logits.device)
        problem_type = self.config.problem_type
        if problem_type is None:  # inferred as transformers' loss will infer it
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type != "single_label_classification":
            return labels.to(logits.dtype)
        if labels.is_floating_point():
            raise ValueError(f"single-label classification needs integer class labels, got {labels.dtype}")
        # a data-dependent check: skipped under torch.compile, where it would break the graph
        if not torch.compiler.is_compiling() and labels.numel() and (
                labels.min() < -100 or labels.max() >= self.num_labels):
            raise ValueError(f"labels must be class indices in [0, {self.num_labels}), got values from "
                             f"{labels.min().item()} to {labels.max().item()}")
        return labels


class DinatBackbone(BackboneMixin, DinatPreTrainedModel):
    """Multi-scale features for detection/segmentation: normalized (B, C, H, W) maps of `config.out_features`.

    transformers' BackboneMixin supplies out_features / out_indices / channels, `backbone_type` and the
    `forward_with_filtered_kwargs` that UperNet, DPT and other heads call.

    Args:
        config: the architecture; `out_features` (names from `config.stage_names`: "stem", "stage1", ...) or
            `out_indices` choose the feature maps.
    """

    def __init__(self, config: DinatConfig):
        super().__init__(config)
        self.embeddings = DinatEmbeddings(config)
        self.encoder = DinatEncoder(config)
        self.num_features = [config.embed_dim, *config.stage_widths]  # per name in stage_names
        self.hidden_states_norms = nn.ModuleDict(
            {stage: DinatLayerNorm(channels) for stage, channels in zip(self.out_features, self.channels)})
        self.post_init()

    def get_input_embeddings(self) -> DinatPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    @filter_output_hidden_states  # hidden_states only when asked for
    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        """Feature maps of the stages in `config.out_features`.

        Args:
            pixel_values: (B, num_channels, H, W) normalized images, any H and W.
            output_hidden_states: also return the stem's and every stage's features (B, h, w, C), each
                stage's before its downsampler (default: the config's).
            output_attentions: also return each stage's last attention weights (default: the config's).
            return_dict: False returns a tuple of the output's non-None fields (default: the config's).
            **kwargs: transformers' forward keywords (`TransformersKwargs`), accepted and unused; any other
                keyword raises a TypeError.

        Returns:
            BackboneOutput: `feature_maps`, one (B, C_i, ceil(H/s_i), ceil(W/s_i)) map per out feature, layer-normed
            (strides s: stem 4, stage i 2 ** (i + 1); channels `self.channels`), and `hidden_states` /
            `attentions` when asked for.
        """
        check_forward_kwargs(self, kwargs)
        output_attentions = _resolve(output_attentions, self.config.output_attentions)
        outputs = self.encoder(self.embeddings(pixel_values), output_attentions=output_attentions,
                               output_hidden_states=True, output_hidden_states_before_downsampling=True)
        feature_maps = ()
        for stage, hidden_state in zip(self.stage_names, outputs.hidden_states):  # (B, H, W, C) each
            if stage in self.out_features:
                normed = self.hidden_states_norms[stage](hidden_state)
                feature_maps += (normed.permute(0, 3, 1, 2).contiguous(),)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


__all__ = ["DinatModel", "DinatForImageClassification", "DinatBackbone", "DinatPreTrainedModel"]
