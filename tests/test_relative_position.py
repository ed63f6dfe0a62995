"""Relative position indices against hand-computed tables, and the table resizing rules."""
import numpy as np
import pytest
import torch

from vlmo_ds.model import relative_position as rp

# window 2 (4 patches), table text length 4: nrd = 3*3 + 3 = 12 rows for images, 12 + 2*4 + 2 = 22 in all.
IMAGE = [[11, 9, 9, 9, 9],
         [10, 4, 3, 1, 0],
         [10, 5, 4, 2, 1],
         [10, 7, 6, 4, 3],
         [10, 8, 7, 5, 4]]
TEXT = [[21, 19, 19],
        [20, 16, 17],
        [20, 15, 16]]


def test_row_counts_match_the_published_sizes():
    assert rp.num_rows(14, 196) == 1126
    assert rp.num_rows(24, 196) == 2606
    assert rp.num_rows(30, 196) == 3878
    assert rp.num_rows(2, 4) == 22


def test_image_index_by_hand():
    assert rp.image_index(2).tolist() == IMAGE


def test_text_index_by_hand():
    assert rp.text_index(3, window=2, table_text_len=4).tolist() == TEXT


def test_fused_index_blocks():
    fused = rp.fused_index(3, window=2, table_text_len=4)
    assert fused.shape == (8, 8)
    assert fused[:3, :3].tolist() == TEXT
    assert fused[3:, 3:].tolist() == IMAGE
    assert (fused[:3, 3:] == 12).all() and (fused[3:, :3] == 13).all()


def test_text_longer_than_table_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        rp.text_index(5, window=2, table_text_len=4)


def test_resize_text_rows_keeps_offsets():
    window, src, dst = 2, 6, 4
    table = torch.arange(rp.num_rows(window, src) * 2, dtype=torch.float32).reshape(-1, 2)
    new = rp.resize_text_rows(table, window, src, dst)
    assert new.shape[0] == rp.num_rows(window, dst)
    old_index, new_index = rp.text_index(4, window, src), rp.text_index(4, window, dst)
    assert torch.equal(table[old_index], new[new_index])  # every (query, key) pair reads the same bias
    back = rp.resize_text_rows(new, window, dst, src)
    assert torch.equal(back[rp.text_index(4, window, src)], table[old_index])


def test_image_resize_same_window_is_identity():
    table = torch.randn(rp.num_rows(3, 4), 6)
    assert rp.resize_image_rows(table, 3, 3) is table


def test_spline_reproduces_cubics_exactly():
    # A not-a-knot cubic spline is exact for cubic polynomials, on any knots: the interpolation of a table whose
    # entries are a cubic in (dy, dx) must give that cubic at the new offsets.
    src_w, dst_w = 4, 6
    src, dst = 2 * src_w - 1, 2 * dst_w - 1
    x, xq = rp._geometric_positions(src, dst)
    f = lambda y, x_: 0.3 * y**3 - 0.1 * x_**2 * y + 2 * x_ + 1
    grid = torch.tensor([[f(y, xx) for xx in x] for y in x], dtype=torch.float64).reshape(-1, 1)
    table = torch.cat([grid, torch.zeros(3 + 2 * 4 + 2, 1, dtype=torch.float64)])
    out = rp.resize_image_rows(table, src_w, dst_w)
    expected = torch.tensor([[f(y, xx) for xx in xq] for y in xq], dtype=torch.float64).reshape(-1, 1)
    assert out.shape[0] == rp.num_rows(dst_w, 4)
    assert torch.allclose(out[: dst * dst], expected, atol=1e-9)
    assert torch.equal(out[dst * dst :], table[src * src :])


def test_geometric_grid_spans_the_target():
    x, xq = rp._geometric_positions(27, 47)  # 224 -> 384 px
    assert len(x) == 27 and x[13] == 0 and np.allclose(x, -x[::-1])
    assert xq[0] == -23 and xq[-1] == 23
    assert x[-1] >= 23 * 0.9  # the source offsets stretch to cover the new grid


def test_window_from_rows():
    assert rp.window_from_rows(1126, 196) == 14
    with pytest.raises(ValueError):
        rp.window_from_rows(1127, 196)
