"""A slow, obviously correct neighborhood attention for checking every backend.

The window of every query is written out one pixel at a time from the formula of NATTEN 0.17's
semantics (tests/fixtures/README.md); only the arithmetic on the gathered windows is vectorized.
"""

import torch


def window_start(i: int, length: int, kernel_size: int, dilation: int) -> tuple[int, int, int]:
    """(group, position in group, window start in group coordinates) of position i on one axis."""
    group, pos = i % dilation, i // dilation
    group_length = -(-(length - group) // dilation)  # ceil((L - g) / d)
    half = kernel_size // 2
    start = max(pos - half, 0) + (pos + half >= group_length) * (group_length - pos - half - 1)
    return group, pos, start


def reference_windows(height: int, width: int, kernel_size: int, dilation: int):
    """For every query (i, j) and window slot (a, b): key position and RPB index, as nested Python lists."""
    key_rows, key_cols, bias_rows, bias_cols = [], [], [], []
    for i in range(height):
        gi, pi, si = window_start(i, height, kernel_size, dilation)
        for j in range(width):
            gj, pj, sj = window_start(j, width, kernel_size, dilation)
            for a in range(kernel_size):
                for b in range(kernel_size):
                    key_rows.append(gi + dilation * (si + a))
                    key_cols.append(gj + dilation * (sj + b))
                    bias_rows.append(si + a - pi + kernel_size - 1)
                    bias_cols.append(sj + b - pj + kernel_size - 1)
    return key_rows, key_cols, bias_rows, bias_cols


def reference_na2d(q, k, v, kernel_size: int, dilation: int, rpb=None, scale=None):
    """Returns (output (B, h, H, W, D), weights (B, h, H, W, K*K)); square kernel and dilation."""
    batch, heads, height, width, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    kk = kernel_size * kernel_size
    rows, cols, bias_rows, bias_cols = (torch.tensor(t) for t in reference_windows(height, width, kernel_size, dilation))
    keys = k[:, :, rows, cols].view(batch, heads, height, width, kk, dim)
    values = v[:, :, rows, cols].view(batch, heads, height, width, kk, dim)
    scores = (q[:, :, :, :, None, :] * scale * keys).sum(-1)  # (B, h, H, W, K*K)
    if rpb is not None:
        scores = scores + rpb[:, bias_rows, bias_cols].view(heads, height, width, kk)
    weights = scores.softmax(-1)
    return (weights[..., None] * values).sum(-2), weights
