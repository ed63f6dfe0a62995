"""Relative position indices into VLMo's one shared bias table, and resizing of that table.

The table has shape [rows, depth * heads]; layer l reads columns [l*H, (l+1)*H). Its rows, in the published order:
    [0, nrd - 3)            image patch -> patch offsets (BEiT's 2-D scheme), nrd = (2W-1)^2 + 3
    nrd-3 / nrd-2 / nrd-1   I_CLS -> patch, patch -> I_CLS, I_CLS -> I_CLS
    nrd                     every text -> image entry of the fused sequence
    nrd + 1                 every image -> text entry
    nrd + 2 + (L-2) + (j-i) text token i -> text token j (both past T_CLS; 2L-3 rows), L = table_text_len
    rows - 3 / -2 / -1      T_CLS -> token, token -> T_CLS, T_CLS -> T_CLS
so rows = nrd + 2L + 2. Index matrices are [query, key].
"""
from __future__ import annotations

import math

import numpy as np
import torch


def num_image_rows(window: int) -> int:
    """nrd: the image part of the table, incl. the three I_CLS rows."""
    return (2 * window - 1) ** 2 + 3


def num_rows(window: int, table_text_len: int) -> int:
    return num_image_rows(window) + 2 * table_text_len + 2


def _cls_index(n: int, offsets: torch.Tensor, first_row: int) -> torch.Tensor:
    """[n+1, n+1]: CLS at position 0 (rows first_row.. +2 for CLS->x, x->CLS, CLS->CLS), `offsets` elsewhere."""
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = offsets
    index[0, :] = first_row
    index[:, 0] = first_row + 1
    index[0, 0] = first_row + 2
    return index


def image_index(window: int) -> torch.Tensor:
    """[1+W*W, 1+W*W] indices for [I_CLS ; patches] (patches in row-major order)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1  # [P, P] query minus key, shifted to start at 0
    dx = xs[:, None] - xs[None, :] + window - 1
    offsets = dy * (2 * window - 1) + dx
    return _cls_index(window * window, offsets, num_image_rows(window) - 3)


def text_index(text_len: int, window: int, table_text_len: int) -> torch.Tensor:
    """[T, T] indices for [T_CLS ; tokens]."""
    if text_len > table_text_len:
        raise ValueError(f"text length {text_len} exceeds the table's text length {table_text_len}")
    pos = torch.arange(text_len - 1)
    offsets = pos[None, :] - pos[:, None] + (table_text_len - 2) + num_image_rows(window) + 2  # key minus query
    return _cls_index(text_len - 1, offsets, num_rows(window, table_text_len) - 3)


def fused_index(text_len: int, window: int, table_text_len: int) -> torch.Tensor:
    """[T+1+P, T+1+P] indices for the fused sequence [text ; I_CLS ; patches]."""
    nrd = num_image_rows(window)
    t, i = text_len, 1 + window * window
    top = torch.cat([text_index(text_len, window, table_text_len), torch.full((t, i), nrd)], dim=1)
    bottom = torch.cat([torch.full((i, t), nrd + 1), image_index(window)], dim=1)
    return torch.cat([top, bottom], dim=0)


def resize_text_rows(table: torch.Tensor, window: int, src_len: int, dst_len: int) -> torch.Tensor:
    """The table re-sized for text length dst_len: the text-text offsets that both cover are kept, new ones are zero.

    Offsets j-i run over [-(L-2), L-2]; the centre row (offset 0) stays the centre.
    """
    nrd = num_image_rows(window)
    end = nrd + 2 + 2 * src_len - 3  # 2L-3 text offsets, then the three T_CLS rows
    head, text, tail = table[: nrd + 2], table[nrd + 2 : end], table[end:]
    if tail.shape[0] != 3:
        raise ValueError(f"table of {table.shape[0]} rows does not fit window {window} and text length {src_len}")
    new = text.new_zeros(2 * dst_len - 3, text.shape[1])
    keep = min(src_len, dst_len) - 2  # largest |offset| present in both
    src_centre, dst_centre = src_len - 2, dst_len - 2
    new[dst_centre - keep : dst_centre + keep + 1] = text[src_centre - keep : src_centre + keep + 1]
    return torch.cat([head, new, tail])


def _not_a_knot_matrix(x: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """[len(xq), len(x)] linear map from values at knots x to the not-a-knot cubic interpolating spline at xq.

    This is the spline FITPACK builds for interpolation with s=0 (knots at the data points, the second and second to
    last removed), which is what the published code's scipy interp2d(kind='cubic') evaluates on a grid.
    """
    n = len(x)
    h = np.diff(x)
    # Unknowns: second derivatives M at the knots. Interior rows: continuity of the first derivative.
    a = np.zeros((n, n))
    b = np.zeros((n, n))  # right-hand side as a linear map of y
    for k in range(1, n - 1):
        a[k, k - 1], a[k, k], a[k, k + 1] = h[k - 1], 2 * (h[k - 1] + h[k]), h[k]
        b[k, k - 1], b[k, k], b[k, k + 1] = 6 / h[k - 1], -6 / h[k - 1] - 6 / h[k], 6 / h[k]
    # Not-a-knot: the third derivative is continuous at the second and second to last knots.
    a[0, 0], a[0, 1], a[0, 2] = h[1], -(h[0] + h[1]), h[0]
    a[-1, -3], a[-1, -2], a[-1, -1] = h[-1], -(h[-2] + h[-1]), h[-2]
    m = np.linalg.solve(a, b)  # M = m @ y
    seg = np.clip(np.searchsorted(x, xq, side="right") - 1, 0, n - 2)
    out = np.zeros((len(xq), n))
    for r, (q, k) in enumerate(zip(xq, seg)):
        hk, t0, t1 = h[k], x[k + 1] - q, q - x[k]
        out[r] += (t0**3 / (6 * hk) - hk * t0 / 6) * m[k] + (t1**3 / (6 * hk) - hk * t1 / 6) * m[k + 1]
        out[r, k] += t0 / hk
        out[r, k + 1] += t1 / hk
    return out


def _geometric_positions(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """BEiT's grid: source offsets spaced geometrically so that they span the target's integer offsets."""
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if (1 - q ** (src // 2)) / (1 - q) > dst // 2:
            hi = q
        else:
            lo = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = np.array([-d for d in reversed(dis)] + [0.0] + dis)
    t = dst // 2
    return x, np.arange(-t, t + 0.1, 1.0)


def resize_image_rows(table: torch.Tensor, src_window: int, dst_window: int) -> torch.Tensor:
    """The table re-sized from a src_window to a dst_window patch grid (e.g. 14 -> 24 for 224 -> 384 px).

    The (2W-1)^2 patch-offset rows are interpolated per column with a bicubic spline on BEiT's geometric grid; the
    three I_CLS rows and every text row are carried over unchanged.
    """
    if src_window == dst_window:
        return table
    src, dst = 2 * src_window - 1, 2 * dst_window - 1
    grid, rest = table[: src * src], table[src * src :]
    x, xq = _geometric_positions(src, dst)
    w = torch.from_numpy(_not_a_knot_matrix(x, xq)).to(torch.float64)  # [dst, src]
    g = grid.to(torch.float64).T.reshape(-1, src, src)  # [columns, y, x]
    out = torch.einsum("ay,cyx,bx->cab", w, g, w)
    out = out.reshape(-1, dst * dst).T.to(table.dtype)
    return torch.cat([out, rest])


def window_from_rows(rows: int, table_text_len: int) -> int:
    """The patch grid side a table of `rows` rows was built for."""
    side = math.isqrt(rows - 2 * table_text_len - 2 - 3)
    window = (side + 1) // 2
    if num_rows(window, table_text_len) != rows:
        raise ValueError(f"a relative table of {rows} rows fits no square patch grid with text length {table_text_len}")
    return window
