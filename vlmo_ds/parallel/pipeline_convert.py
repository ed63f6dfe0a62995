"""Exact conversion between whole-model state dicts and pipeline-stage state dicts.

A stage's keys are the consolidated keys of what it holds (vlmo_ds.parallel.pipeline_stage):
    transformer.blocks.i.*                               the stage whose block range holds i
    transformer.{patch_embed, cls_token, pos_embed, mask_token}, text_embeddings.*, token_type_embeddings.*
                                                         the first stage
    relative_position_bias_table [R, L*h]                every stage: columns [start*h, stop*h) of its blocks
    everything else (transformer.norm, pooler, ITC/ITM/MLM/MIM heads, logit scales)   the last stage
h is the number of heads in the table: H for consolidated weights, H / t for a tensor-parallel shard, so the same
functions cut a TP shard into its stages (TP x PP: tp_convert.shard_state_dict, then stage_state_dict). Values are
sliced and concatenated, never computed: split then merge is bit-exact.
"""
from __future__ import annotations

import re

import torch

from vlmo_ds.model.config import ModelConfig
from vlmo_ds.parallel.pipeline_stage import FIRST_STAGE_MODULES, split_blocks
from vlmo_ds.parallel.tp_convert import TABLE

_BLOCK = re.compile(r"transformer\.blocks\.(\d+)\.")
_FIRST = re.compile(r"transformer\.(patch_embed\.|cls_token$|pos_embed$|mask_token$)|(" +
                    "|".join(FIRST_STAGE_MODULES) + r")\.")


def stage_of_key(key: str, cfg: ModelConfig, stages: int) -> int | None:
    """The stage holding `key`; None for the relative table (a column slice on every stage)."""
    if key == TABLE:
        return None
    if match := _BLOCK.match(key):
        index = int(match.group(1))
        return next(s for s, blocks in enumerate(split_blocks(cfg.depth, stages)) if index in blocks)
    return 0 if _FIRST.match(key) else stages - 1


def _table_heads(table: torch.Tensor, cfg: ModelConfig) -> int:
    if table.dim() != 2 or table.shape[1] % cfg.depth:
        raise ValueError(f"{TABLE} has shape {tuple(table.shape)}; its columns must be model.depth={cfg.depth} "
                         "times the heads (check that the weights and the config describe the same model)")
    return table.shape[1] // cfg.depth


def stage_state_dict(full: dict[str, torch.Tensor], cfg: ModelConfig, stage: int,
                     stages: int) -> dict[str, torch.Tensor]:
    """Stage `stage`'s tensors of `full` (consolidated or one tensor-parallel shard); new tensors."""
    if not 0 <= stage < stages:
        raise ValueError(f"pipeline stage {stage} is outside 0..{stages - 1}")
    blocks = split_blocks(cfg.depth, stages)[stage]
    out = {}
    for key, value in full.items():
        owner = stage_of_key(key, cfg, stages)
        if owner is None:
            h = _table_heads(value, cfg)
            out[key] = value[:, blocks.start * h : blocks.stop * h].clone()
        elif owner == stage:
            out[key] = value.clone()
    return out


def merge_stage_state_dicts(parts: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The whole state dict (consolidated, or the TP shard the stages were cut from) of stages 0..n-1 in order."""
    if not parts:
        raise ValueError("merge_stage_state_dicts needs the state dicts of every pipeline stage, got none")
    stages = len(parts)
    out: dict[str, torch.Tensor] = {}
    for stage, part in enumerate(parts):
        for key, value in part.items():
            owner = stage_of_key(key, cfg, stages)
            if owner is not None and owner != stage:
                raise ValueError(f"{key} belongs to stage {owner} of {stages} but came in stage {stage}'s state "
                                 "dict; pass the stages of one checkpoint in stage order")
            if owner is not None:
                out[key] = value.clone()
    if any(TABLE in part for part in parts):
        if not all(TABLE in part for part in parts):
            raise ValueError(f"{TABLE} is missing from some pipeline stages; pass every stage's state dict")
        out[TABLE] = torch.cat([part[TABLE] for part in parts], dim=1)
        _table_heads(out[TABLE], cfg)
    return out
