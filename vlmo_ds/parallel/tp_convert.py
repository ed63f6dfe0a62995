"""Exact conversion between consolidated weights (the single-process state dict) and tensor-parallel shards.

Keys are the same in both layouts; values are cut as the tensor-parallel model holds them (t ranks, H heads,
h = H / t local heads, hd head dim, D dim, F FFN width, V vocabulary, L depth, R table rows):

    blocks.i.attn.qkv.weight        [3D, D], rows [q ; k ; v]  ->  rank r: [q_r ; k_r ; v_r], q_r = the q rows of
                                    heads [r*h, (r+1)*h); one reshape serves every size (t = 1: the published order)
    blocks.i.attn.q_bias / v_bias   [D] -> [D / t]    (heads are contiguous blocks of hd entries)
    blocks.i.attn.proj.weight       [D, D] -> [D, D / t]           (row-parallel: input columns)
    blocks.i.mlp_*.fc1.weight/bias  [F, D] / [F] -> [F / t, D] / [F / t]
    blocks.i.mlp_*.fc2.weight       [D, F] -> [D, F / t]
    relative_position_bias_table    [R, L*H], layer l in columns [l*H, (l+1)*H)  ->  [R, L*h], layer l in columns
                                    [l*h, (l+1)*h) holding heads [r*h, (r+1)*h) of layer l (layer-major, as the
                                    model reads it: one parameter per rank, chunked by layer)
    text_embeddings.word_embeddings.weight, mlm_score.decoder.weight [V, D] -> [V / t, D]
    mlm_score.bias                  [V] -> [V / t]
    everything else (norms, row-parallel biases, heads, modality embeddings, scales): whole on every rank.

Merging takes replicated tensors from rank 0 (as megatron does: on GPUs, non-deterministic kernels can leave
replicas a rounding apart). Shard then merge is bit-exact; no arithmetic touches a value.
"""
from __future__ import annotations

import re

import torch

from vlmo_ds.model import relative_position as rp
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.parallel.layout_rules import check_tensor_parallel

__all__ = ["TABLE", "check_tensor_parallel", "merge_state_dicts", "partition_dim", "shard_state_dict"]

TABLE = "relative_position_bias_table"
_QKV = re.compile(r"transformer\.blocks\.\d+\.attn\.qkv\.weight")
_SPLIT_ROWS = re.compile(r"transformer\.blocks\.\d+\.(attn\.[qv]_bias|mlp_(text|imag|vl)\.fc1\.(weight|bias))"
                         r"|text_embeddings\.word_embeddings\.weight|mlm_score\.decoder\.weight|mlm_score\.bias")
_SPLIT_COLUMNS = re.compile(r"transformer\.blocks\.\d+\.(attn\.proj|mlp_(text|imag|vl)\.fc2)\.weight")


def partition_dim(key: str) -> int | None:
    """The dimension along which a shard of `key` is this rank's share (None: held whole on every rank)."""
    if _QKV.fullmatch(key) or _SPLIT_ROWS.fullmatch(key):
        return 0
    if key == TABLE or _SPLIT_COLUMNS.fullmatch(key):
        return 1
    return None


def _table_shape(cfg: ModelConfig) -> tuple[int, int]:
    return rp.num_rows(cfg.window, cfg.table_text_len), cfg.depth


def _check_shape(key: str, value: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {expected} for this model config; "
                         "check that the weights and the config describe the same model")


def shard_state_dict(full: dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                     cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rank `tp_rank`'s tensors of a model split over `tp_size` ranks (new tensors; `full` is left as it was)."""
    check_tensor_parallel(cfg, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} is outside 0..{tp_size - 1}")
    h = cfg.heads // tp_size
    heads = slice(tp_rank * h, (tp_rank + 1) * h)
    out = {}
    for key, value in full.items():
        if _QKV.fullmatch(key):
            _check_shape(key, value, (3 * cfg.dim, cfg.dim))
            part = value.reshape(3, cfg.heads, cfg.head_dim, cfg.dim)[:, heads].reshape(-1, cfg.dim)
        elif key == TABLE:
            rows, depth = _table_shape(cfg)
            _check_shape(key, value, (rows, depth * cfg.heads))
            part = value.reshape(rows, depth, cfg.heads)[:, :, heads].reshape(rows, depth * h)
        elif (dim := partition_dim(key)) is not None:
            part = value.chunk(tp_size, dim)[tp_rank]
        else:
            part = value
        out[key] = part.clone()
    return out


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The consolidated state dict of the shards of tensor-parallel ranks 0..t-1 (in rank order)."""
    if not shards:
        raise ValueError("merge_state_dicts needs the shards of every tensor-parallel rank, got none")
    tp_size = len(shards)
    check_tensor_parallel(cfg, tp_size)
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            raise ValueError(f"tensor-parallel shard {rank} has other keys than shard 0 "
                             f"({sorted(set(shard) ^ set(keys))[:5]}); pass shards of one checkpoint")
    out = {}
    for key in keys:
        parts = [shard[key] for shard in shards]
        if _QKV.fullmatch(key):
            value = torch.cat([p.reshape(3, -1, cfg.dim) for p in parts], dim=1).reshape(-1, cfg.dim)
            _check_shape(key, value, (3 * cfg.dim, cfg.dim))
        elif key == TABLE:
            rows, depth = _table_shape(cfg)
            value = torch.cat([p.reshape(rows, depth, -1) for p in parts], dim=2).reshape(rows, -1)
            _check_shape(key, value, (rows, depth * cfg.heads))
        elif (dim := partition_dim(key)) is not None:
            value = torch.cat(parts, dim)
        else:
            value = parts[0].clone()
        out[key] = value
    return out
