"""Handing weights from one stage to the next: re-size what the new stage's shapes need, initialise what is new.

A stage's model may differ from the weights it starts from (the previous stage's, or an external checkpoint):
    relative_position_bias_table  text rows re-sized when the table's text length differs (the offsets both lengths
                                  cover are kept, new ones start at zero); image rows interpolated BEiT-style when
                                  the patch grid differs. A text length change between stages needs neither: the
                                  table's text rows are sized by model.table_text_len, only the index changes.
    text_embeddings.position_embeddings  (absolute text positions, models without the relative bias) the first rows
                                  are kept when the text gets shorter; growing has no rule and is refused.
    transformer.pos_embed         (absolute image positions) the patch grid interpolated bicubically, I_CLS kept.
Parameters the weights lack (a MIM head in a new image stage, anything an external checkpoint does not hold) keep
the new model's initialisation, as in the published code: the VL experts start random unless the stage asks for
`init_vl_from_text`. Entries the model has no place for (the MIM head after the image stage) are left out; they stay
in the previous stage's checkpoint.
Shapes: R table rows, C = depth x heads columns, L text length, P patches, D dim.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmo_ds.model import relative_position as rp
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.published import DERIVED_KEYS, SCALARS, UNUSED_WITH_REL_POS
from vlmo_ds.model.vlmo import VLMo

log = logging.getLogger(__name__)

TABLE = "relative_position_bias_table"
TEXT_POSITIONS = "text_embeddings.position_embeddings.weight"
IMAGE_POSITIONS = "transformer.pos_embed"
PUBLISHED_TABLE_TEXT_LEN = 196


@dataclass
class StartReport:
    """How a stage's model was filled from its start weights."""

    resized: list[str] = field(default_factory=list)
    kept_init: list[str] = field(default_factory=list)
    """Model entries the weights did not hold (they keep the new model's initialisation)."""
    left_out: list[str] = field(default_factory=list)
    """Entries of the weights the model has no place for."""


def _table_text_len(rows: int, window: int | None, candidates: list[int]) -> tuple[int, int]:
    """(window, table text length) of a table of `rows` rows, trying the given text lengths in order."""
    for text_len in candidates:
        try:
            found = rp.window_from_rows(rows, text_len)
        except ValueError:
            continue
        if window is None or found == window:
            return found, text_len
    lengths = " or ".join(map(str, candidates))
    raise ValueError(f"{TABLE}: {rows} rows fit no square patch grid with text length {lengths}; the weights were "
                     "made for another model")


def fit_table(table: torch.Tensor, dst: ModelConfig, src: ModelConfig | None) -> torch.Tensor:
    """[R, C] -> the table `dst` needs; `src` (the weights' config) is inferred from the row count when None."""
    if src is not None:
        window, text_len = src.window, src.table_text_len
    else:
        window, text_len = _table_text_len(table.shape[0], None, [dst.table_text_len, PUBLISHED_TABLE_TEXT_LEN])
    if table.shape[1] != dst.depth * dst.heads:
        raise ValueError(f"{TABLE}: {table.shape[1]} columns but the model has depth x heads = "
                         f"{dst.depth * dst.heads}; the weights were made for another model")
    if text_len != dst.table_text_len:
        table = rp.resize_text_rows(table, window, text_len, dst.table_text_len)
    return rp.resize_image_rows(table, window, dst.window)


def fit_text_positions(weight: torch.Tensor, dst: ModelConfig) -> torch.Tensor:
    """[L_src, D] -> [L_dst, D] by keeping the first rows; a longer text has no rule."""
    if weight.shape[0] < dst.max_text_len:
        raise ValueError(f"{TEXT_POSITIONS}: the weights hold {weight.shape[0]} text positions, the stage needs "
                         f"{dst.max_text_len}; absolute text positions cannot grow: shorten the stage's text_len")
    return weight[: dst.max_text_len]


def fit_image_positions(pos: torch.Tensor, dst: ModelConfig) -> torch.Tensor:
    """[1, 1+P_src, D] -> [1, 1+P_dst, D]: the patch grid interpolated bicubically, the I_CLS position kept."""
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ValueError(f"{IMAGE_POSITIONS}: {pos.shape[1] - 1} patch positions are no square grid")
    if side == dst.window:
        return pos
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # [1, D, side, side]
    grid = F.interpolate(grid, size=(dst.window, dst.window), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, dst.num_patches, -1).to(pos.dtype)
    return torch.cat([pos[:, :1], grid], dim=1)


def fit_state_dict(state: dict[str, torch.Tensor], dst: ModelConfig, src: ModelConfig | None = None,
                   report: StartReport | None = None) -> dict[str, torch.Tensor]:
    """The weights with every re-sizable tensor fitted to `dst`; derived published entries dropped."""
    report = report if report is not None else StartReport()
    state = {k: v for k, v in state.items() if k not in DERIVED_KEYS}
    if dst.rel_pos:
        state = {k: v for k, v in state.items() if k not in UNUSED_WITH_REL_POS}
    for key in SCALARS:
        if key in state and state[key].dim() == 0:
            state[key] = state[key].reshape(1)
    if dst.rel_pos:
        fitters = {TABLE: lambda t: fit_table(t, dst, src)}
    else:
        fitters = {TEXT_POSITIONS: lambda t: fit_text_positions(t, dst),
                   IMAGE_POSITIONS: lambda t: fit_image_positions(t, dst)}
    for key, fit in fitters.items():
        if key in state:
            before = tuple(state[key].shape)
            state[key] = fit(state[key])
            if tuple(state[key].shape) != before:
                report.resized.append(f"{key} {before} -> {tuple(state[key].shape)}")
    return state


def load_start_weights(model: VLMo, state: dict[str, torch.Tensor], src: ModelConfig | None = None) -> StartReport:
    """Fill `model` from `state` (re-sized to the model's config); a shape no rule can fit is a ValueError."""
    report = StartReport()
    state = fit_state_dict(state, model.cfg, src, report)
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs the model's {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"the start weights do not fit this stage's model and no resize rule applies: "
                         f"{'; '.join(mismatched)}; check model.preset and the stage's image_size / text_len")
    report.left_out = sorted(k for k in state if k not in own)
    report.kept_init = sorted(k for k in own if k not in state)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report


def copy_text_to_vl(model: VLMo) -> int:
    """Each VL block's VL expert (norm2_vl, mlp_vl) set to a copy of its text expert; returns the blocks changed."""
    changed = 0
    for block in model.transformer.blocks:
        if block.with_vl:
            block.norm2_vl.load_state_dict(block.norm2_text.state_dict())
            block.mlp_vl.load_state_dict(block.mlp_text.state_dict())
            changed += 1
    return changed
