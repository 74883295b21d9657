"""Window arithmetic of 2-D (dilated) neighborhood attention, in one place, and the tiling plan built on it.

Semantics (NATTEN 0.17): an axis of length L with dilation d splits into d interleaved groups (positions
i with i % d == g). Each group is an ordinary axis of length ceil((L - g) / d) on which the window of K
keys is clamped to stay inside (`window_start`), so every query sees exactly K keys per axis; a key's
relative-position-bias (RPB) index is its offset from the query plus K - 1.

Every path reads its windows from here: the unfused pair through `window_indices`, flex attention through
`window_start`, and both fused paths (the eager tiled kernel and the traced decomposable one) through the
same `CallPlan`: classes of equal-length dilation groups, each cut into query tiles that attend to halos
of keys, with one bias index per class that holds the window shape and the RPB.

It also holds the questions every op asks of a call before choosing a path: whether autograd records it
(`needs_grad`) and whether torch.export is tracing it (`is_exporting`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

Pair = tuple[int, int]


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record a call on `tensors` (None entries ignored): grad mode on and one needs it."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def is_exporting() -> bool:
    """Whether torch.export (or ONNX export through it) is tracing, as opposed to torch.compile.

    Reads torch's flag itself: some torch releases constant-fold `torch.compiler.is_exporting()` to True inside
    every dynamo trace, torch.compile included, which would put the export-only decomposition into compiled graphs.
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def window_start(query, length, kernel_size: int):
    """First key of the window of `query` on an (undilated) axis of `length`: clamp(query - K//2, 0, L - K).

    Works on ints and tensors alike (`length` may be a tensor when it varies per query)."""
    start = query - kernel_size // 2
    if isinstance(start, torch.Tensor):
        start = start.clamp(min=0)
        limit = length - kernel_size
        return torch.minimum(start, limit) if isinstance(limit, torch.Tensor) else start.clamp(max=limit)
    return min(max(start, 0), length - kernel_size)


def check_can_run(height: int, width: int, kernel_size: Pair, dilation: Pair) -> None:
    """Raise ValueError if a (height, width) map cannot hold the dilated window."""
    for axis, length, ks, dil in (("height", height, kernel_size[0], dilation[0]),
                                  ("width", width, kernel_size[1], dilation[1])):
        if length < ks * dil:
            raise ValueError(
                f"neighborhood attention needs {axis} >= kernel_size * dilation = {ks} * {dil} = {ks * dil}, "
                f"got {length}; pad the input first (DinatLayer does this automatically)")


def window_indices(length: int, kernel_size: int, dilation: int, device: torch.device | None = None):
    """Key positions and RPB offsets of every query's window along one axis.

    Returns `(keys, rel)`, both (length, kernel_size) long tensors: `keys[i, t]` is the position of the
    t-th key in the window of query i, and `rel[i, t]` its index along the RPB axis (0 .. 2K-2).
    """
    pos = torch.arange(length, device=device)
    group, pos_in_group = pos % dilation, pos // dilation
    group_length = (length - group + dilation - 1) // dilation  # ceil((L - g) / d)
    key_in_group = window_start(pos_in_group, group_length, kernel_size)[:, None] + torch.arange(kernel_size,
                                                                                                   device=device)
    keys = group[:, None] + dilation * key_in_group
    rel = key_in_group - pos_in_group[:, None] + kernel_size - 1
    return keys, rel


# -- dilation groups ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupClass:
    """Dilation groups of one axis that have the same length: positions offset + g + i * dilation for
    g < n_groups, i < length (an `unfold` with step `dilation`: a view)."""

    offset: int
    n_groups: int
    length: int
    dilation: int


def group_classes(length: int, dilation: int) -> tuple[GroupClass, ...]:
    """Groups g < length % dilation have one more position than the rest: at most two classes."""
    longer = length % dilation
    classes = [GroupClass(0, longer, length // dilation + 1, dilation)] if longer else []
    classes.append(GroupClass(longer, dilation - longer, length // dilation, dilation))
    return tuple(classes)


# -- tiles and halos ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisPlan:
    """How one (undilated) axis of length `length` is cut into query tiles and key halos."""

    length: int
    kernel_size: int
    tile: int
    n_tiles: int
    halo: int  # keys each tile sees: the whole axis for one tile, else tile + kernel_size - 1
    pad_before: int  # key padding so that halo t starts at t * tile - pad_before, a uniform step
    pad_after: int

    @property
    def padded_queries(self) -> int:
        return self.n_tiles * self.tile


def _axis_plan_for_tile(length: int, kernel_size: int, tile: int) -> AxisPlan:
    if tile >= length:
        return AxisPlan(length, kernel_size, length, 1, length, 0, 0)
    n_tiles = -(-length // tile)
    half = kernel_size // 2
    halo = tile + kernel_size - 1
    return AxisPlan(length, kernel_size, tile, n_tiles, halo, half, n_tiles * tile - length + half)


def tile_fits(length: int, kernel_size: int, tile: int) -> bool:
    """Whether every query's clamped window lies inside its tile's halo.

    Windows near the ends are clamped inward; that stays inside the halo when the first tile has more
    than K//2 queries and the last tile (if partial) has more than K//2 real queries.
    """
    half = kernel_size // 2
    return tile >= length or (tile > half and (length % tile == 0 or length % tile > half))


# Overheads in queries per tile, fitted to CPU timings of DiNAT's shapes (K=7, head_dim 32): float32 matmuls
# lose more to small tiles than bfloat16 ones (7x7 tiles at 56x56 in float32, 4x4 in bfloat16).
TILE_OVERHEAD = 6
TILE_OVERHEAD_HALF = 2


@functools.lru_cache(maxsize=256)
def plan_axis(length: int, kernel_size: int, tile: int | None = None, half_precision: bool = False) -> AxisPlan:
    """Pick the tile size along one axis: the least work (padded queries x halo keys), counting a fixed
    overhead per tile that stands for the lower efficiency of small matmuls."""
    if tile is not None:
        if not tile_fits(length, kernel_size, tile):
            raise ValueError(f"tile {tile} does not fit an axis of length {length} with kernel {kernel_size}")
        return _axis_plan_for_tile(length, kernel_size, tile)
    overhead = TILE_OVERHEAD_HALF if half_precision else TILE_OVERHEAD
    best, best_cost = None, None
    for candidate in range(kernel_size // 2 + 1, length + 1):
        if not tile_fits(length, kernel_size, candidate):
            continue
        plan = _axis_plan_for_tile(length, kernel_size, candidate)
        cost = plan.n_tiles * (plan.tile + overhead) * plan.halo
        if best_cost is None or cost < best_cost:
            best, best_cost = plan, cost
    return best


def _axis_masks(plan: AxisPlan):
    """(allowed, rel), each (n_tiles, tile, halo): is halo key m in the window of query j of tile t, and
    its RPB index. Padding queries past the end borrow the window of the last query."""
    query = (torch.arange(plan.n_tiles)[:, None] * plan.tile + torch.arange(plan.tile)).clamp(max=plan.length - 1)
    start = window_start(query, plan.length, plan.kernel_size)
    key = (torch.arange(plan.n_tiles) * plan.tile - plan.pad_before)[:, None] + torch.arange(plan.halo)
    offset = key[:, None, :] - start[:, :, None]
    allowed = (offset >= 0) & (offset < plan.kernel_size)
    rel = key[:, None, :] - query[:, :, None] + plan.kernel_size - 1
    return allowed, rel


def halo_positions(plan: AxisPlan) -> torch.Tensor:
    """(n_tiles, halo) positions of each tile's halo keys on the axis padded by `pad_before` / `pad_after`."""
    return (torch.arange(plan.n_tiles) * plan.tile)[:, None] + torch.arange(plan.halo)


@functools.lru_cache(maxsize=128)
def _bias_index_cpu(plan_h: AxisPlan, plan_w: AxisPlan) -> torch.Tensor:
    allowed_h, rel_h = _axis_masks(plan_h)
    allowed_w, rel_w = _axis_masks(plan_w)
    span_w = 2 * plan_w.kernel_size - 1
    outside = (2 * plan_h.kernel_size - 1) * span_w
    # (nTh, nTw, Th, Tw, Hh, Hw)
    flat = rel_h[:, None, :, None, :, None] * span_w + rel_w[None, :, None, :, None, :]
    allowed = allowed_h[:, None, :, None, :, None] & allowed_w[None, :, None, :, None, :]
    flat = torch.where(allowed, flat, torch.full_like(flat, outside))
    return flat.reshape(plan_h.n_tiles, plan_w.n_tiles, plan_h.tile * plan_w.tile, -1)


_BIAS_INDEX_ON_DEVICE: dict = {}


def bias_index(plan_h: AxisPlan, plan_w: AxisPlan, device) -> torch.Tensor:
    """(nTh, nTw, Th*Tw, Hh*Hw) long: flat RPB index of each (query, halo key), or R = (2Kh-1)(2Kw-1)
    (a slot holding -inf) where the key is outside the query's window. Built once per plan and device."""
    if torch.compiler.is_compiling():  # traced: built in the graph (a constant folded by the compiler)
        return _bias_index_cpu.__wrapped__(plan_h, plan_w).to(device)
    device = torch.device(device)
    if device.type == "cpu":
        return _bias_index_cpu(plan_h, plan_w)
    key = (plan_h, plan_w, device)
    if key not in _BIAS_INDEX_ON_DEVICE:
        if len(_BIAS_INDEX_ON_DEVICE) > 64:
            _BIAS_INDEX_ON_DEVICE.clear()
        _BIAS_INDEX_ON_DEVICE[key] = _bias_index_cpu(plan_h, plan_w).to(device)
    return _BIAS_INDEX_ON_DEVICE[key]


def tile_bias(rpb: torch.Tensor | None, heads: int, plan_h: AxisPlan, plan_w: AxisPlan, device,
              dtype: torch.dtype) -> torch.Tensor:
    """(heads or 1, nTh, nTw, Th*Tw, Hh*Hw): the RPB inside each window, -inf outside (differentiable in rpb)."""
    index = bias_index(plan_h, plan_w, device)
    n_rel = (2 * plan_h.kernel_size - 1) * (2 * plan_w.kernel_size - 1)
    outside = torch.full((heads if rpb is not None else 1, 1), float("-inf"), device=device, dtype=dtype)
    if rpb is None:
        table = torch.cat([torch.zeros(1, n_rel, device=device, dtype=dtype), outside], dim=1)
    else:
        table = torch.cat([rpb.reshape(heads, n_rel).to(dtype), outside], dim=1)
    return table[:, index]


# -- the plan of one call ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassPlan:
    """One class of equal-length dilation groups (rows x cols) and its tiling."""

    rows: GroupClass
    cols: GroupClass
    plan_h: AxisPlan
    plan_w: AxisPlan

    @property
    def keeps_probabilities(self) -> bool:
        """Keep the probabilities for backward when each query's halo has at most 2 K*K keys (the reference
        keeps two K*K tensors per query: the softmax output and its dropout); recompute them otherwise."""
        return self.plan_h.halo * self.plan_w.halo <= 2 * self.plan_h.kernel_size * self.plan_w.kernel_size


def tile_pair(tile) -> tuple:
    """A forced tile size as (rows, cols): one int for both, a pair, or None (chosen by `plan_axis`)."""
    return tuple(tile) if isinstance(tile, (tuple, list)) else (tile, tile)


@functools.lru_cache(maxsize=256)
def plan_call(height: int, width: int, kernel_size: Pair, dilation: Pair, tile: tuple = (None, None),
              half_precision: bool = False) -> tuple[ClassPlan, ...]:
    """Every class of dilation groups of a (height, width) map, with its tiles, halos and bias index shape."""
    return tuple(
        ClassPlan(rows, cols, plan_axis(rows.length, kernel_size[0], tile[0], half_precision),
                  plan_axis(cols.length, kernel_size[1], tile[1], half_precision))
        for rows in group_classes(height, dilation[0]) for cols in group_classes(width, dilation[1]))


__all__ = ["is_exporting", "window_start", "window_indices", "check_can_run", "GroupClass", "group_classes", "AxisPlan",
           "plan_axis", "tile_fits", "halo_positions", "bias_index", "tile_bias", "ClassPlan", "plan_call", "tile_pair"]
