"""BEiT weights -> the image side of VLMo (the image-only stage starts from them), and back.

Keys read (microsoft/unilm beit: modeling_finetune.py, modeling_pretrain.py; timm's Beit uses the same names):
    cls_token, patch_embed.proj.*                      -> transformer.cls_token, transformer.patch_embed.proj.*
    pos_embed (absolute positions, rare)               -> transformer.pos_embed
    blocks.i.{norm1, attn.qkv, attn.q_bias, attn.v_bias, attn.proj, gamma_1, gamma_2}
                                                       -> transformer.blocks.i.* (shared attention, layer scales)
    blocks.i.norm2, blocks.i.mlp.fc1 / fc2             -> transformer.blocks.i.norm2_imag, mlp_imag.fc1 / fc2
    rel_pos_bias.relative_position_bias_table [nrd, H] (one table shared by every layer, BEiT pre-training)
    or blocks.i.attn.relative_position_bias_table [nrd, H] (one per layer, fine-tuned BEiT and timm)
                                                       -> rows [0, nrd) of relative_position_bias_table, columns
                                                          [i*H, (i+1)*H) of layer i (the text rows stay zero)
    norm (the final norm, when BEiT has one)           -> transformer.norm
    mask_token, lm_head (BEiT's masked image modelling over 8192 visual tokens)
                                                       -> transformer.mask_token, mim_head (mim_targets "tokens")
Checked and dropped: relative_position_index buffers (must equal ours: the same 2-D offset order, the three CLS rows
last) and timm's k_bias buffer (must be zero). Reported, not mapped: fc_norm, head (classification) and anything
else. The output is partial weights (metadata "partial": "image"): a stage loads them with load_start_weights and
keeps its initialisation for the text side.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.model import relative_position as rp
from vlmo_ds.model.config import ModelConfig, preset

TABLE = "relative_position_bias_table"
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_BLOCK_KEYS = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "attn.qkv.weight": "attn.qkv.weight",
               "attn.q_bias": "attn.q_bias", "attn.v_bias": "attn.v_bias", "attn.proj.weight": "attn.proj.weight",
               "attn.proj.bias": "attn.proj.bias", "gamma_1": "gamma_1", "gamma_2": "gamma_2",
               "norm2.weight": "norm2_imag.weight", "norm2.bias": "norm2_imag.bias",
               "mlp.fc1.weight": "mlp_imag.fc1.weight", "mlp.fc1.bias": "mlp_imag.fc1.bias",
               "mlp.fc2.weight": "mlp_imag.fc2.weight", "mlp.fc2.bias": "mlp_imag.fc2.bias"}
_TOP_KEYS = {"cls_token": "transformer.cls_token", "pos_embed": "transformer.pos_embed",
             "patch_embed.proj.weight": "transformer.patch_embed.proj.weight",
             "patch_embed.proj.bias": "transformer.patch_embed.proj.bias", "norm.weight": "transformer.norm.weight",
             "norm.bias": "transformer.norm.bias", "mask_token": "transformer.mask_token",
             "lm_head.weight": "mim_head.weight", "lm_head.bias": "mim_head.bias"}
_INDEX = re.compile(r"(rel_pos_bias|blocks\.\d+\.attn)\.relative_position_index")
_K_BIAS = re.compile(r"blocks\.\d+\.attn\.k_bias")


@dataclass
class BeitImport:
    """The image-side weights in our names, their config, and what happened to every BEiT key."""

    cfg: ModelConfig
    weights: dict[str, torch.Tensor]
    mapped: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    """Derived buffers compared with ours and dropped."""
    unmapped: list[str] = field(default_factory=list)
    shared_table: bool = True


_SHAPE_FIELDS = ("dim", "depth", "heads", "mlp_ratio", "patch_size", "in_chans")


def _describe(shape: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in shape.items())


def beit_config(state: dict[str, torch.Tensor], name: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Preset `name` at the BEiT weights' image size (and MIM head); a CheckpointError when they differ in shape."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError("not a BEiT state dict: cls_token / patch_embed.proj.weight missing")
    want = preset(name)
    dim, in_chans, patch = (state["patch_embed.proj.weight"].shape[i] for i in (0, 1, 2))
    tables = [state[k] for k in state if k.endswith(TABLE)]
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    found = {"dim": dim, "depth": 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1),
             "heads": tables[0].shape[1] if tables else want.heads,
             "mlp_ratio": fc1.shape[0] // dim if fc1 is not None else want.mlp_ratio,
             "patch_size": patch, "in_chans": in_chans}
    wanted = {k: getattr(want, k) for k in _SHAPE_FIELDS}
    if found != wanted:
        raise CheckpointError(f"the BEiT checkpoint has {_describe(found)} but --preset {name} has "
                              f"{_describe(wanted)}; pass the preset of its size (base for BEiT-base, large for "
                              "BEiT-large)")
    scales = "blocks.0.gamma_1" in state
    if scales != (want.layer_scale_init is not None):
        raise CheckpointError(f"the BEiT checkpoint {'has' if scales else 'lacks'} layer scales (gamma_1, gamma_2) "
                              f"but --preset {name} {'does' if want.layer_scale_init is not None else 'does not'}")
    if tables and not want.rel_pos:
        raise CheckpointError(f"the BEiT checkpoint uses relative positions; --preset {name} does not")
    changes: dict[str, Any] = {}
    if tables:  # [nrd, H]: the image rows alone; with our text rows the whole table fits a window
        rows = tables[0].shape[0] + 2 * want.table_text_len + 2
        changes["image_size"] = rp.window_from_rows(rows, want.table_text_len) * patch
    elif "pos_embed" in state:
        changes["image_size"] = round((state["pos_embed"].shape[1] - 1) ** 0.5) * patch
    if "lm_head.weight" in state:
        changes |= {"mim_targets": "tokens", "mim_vocab_size": state["lm_head.weight"].shape[0]}
    return want.replace(**(changes | (overrides or {})))


def import_beit(state: dict[str, torch.Tensor], cfg: ModelConfig) -> BeitImport:
    """BEiT tensors (already unwrapped: no "model."/"module." level) -> our names; see the module docstring."""
    out = BeitImport(cfg, {})
    h, nrd = cfg.heads, rp.num_image_rows(cfg.window)
    table = torch.zeros(rp.num_rows(cfg.window, cfg.table_text_len), cfg.depth * h)
    filled: set[int] = set()
    for key, value in state.items():
        block = _BLOCK.fullmatch(key)
        if key in _TOP_KEYS:
            out.weights[_TOP_KEYS[key]] = value.float().clone()
        elif block and block.group(2) in _BLOCK_KEYS:
            out.weights[f"transformer.blocks.{block.group(1)}.{_BLOCK_KEYS[block.group(2)]}"] = value.float().clone()
        elif key == SHARED_TABLE or (block and block.group(2) == f"attn.{TABLE}"):
            _check_rows(key, value, nrd, h)
            layers = range(cfg.depth) if key == SHARED_TABLE else [int(block.group(1))]
            for layer in layers:
                table[:nrd, layer * h:(layer + 1) * h] = value.float()
                filled.add(layer)
            out.shared_table = key == SHARED_TABLE
        elif _INDEX.fullmatch(key):
            if not torch.equal(value.long(), rp.image_index(cfg.window)):
                raise CheckpointError(f"{key} differs from vlmo_ds's image index for a {cfg.window}x{cfg.window} "
                                      "grid; the checkpoint orders its relative offsets another way")
            out.checked.append(key)
            continue
        elif _K_BIAS.fullmatch(key):
            if value.abs().max() != 0:
                raise CheckpointError(f"{key} is not zero; VLMo's attention has no key bias")
            out.checked.append(key)
            continue
        else:
            out.unmapped.append(key)
            continue
        out.mapped.append(key)
    if filled:
        if filled != set(range(cfg.depth)):
            raise CheckpointError(f"the BEiT checkpoint has relative tables for layers {sorted(filled)} only")
        out.weights[TABLE] = table
    return out


def _check_rows(key: str, value: torch.Tensor, nrd: int, heads: int) -> None:
    if tuple(value.shape) != (nrd, heads):
        raise CheckpointError(f"{key} has shape {tuple(value.shape)}, expected ({nrd}, {heads})")


def export_beit(weights: dict[str, torch.Tensor], cfg: ModelConfig, shared_table: bool) -> dict[str, torch.Tensor]:
    """The inverse of import_beit on the keys it maps (relative tables: one shared, or one per layer)."""
    inverse_top = {v: k for k, v in _TOP_KEYS.items()}
    inverse_block = {v: k for k, v in _BLOCK_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key in inverse_top:
            out[inverse_top[key]] = value.clone()
        elif (m := re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)", key)) and m.group(2) in inverse_block:
            out[f"blocks.{m.group(1)}.{inverse_block[m.group(2)]}"] = value.clone()
    if TABLE in weights:
        h, nrd = cfg.heads, rp.num_image_rows(cfg.window)
        per_layer = [weights[TABLE][:nrd, i * h:(i + 1) * h].clone() for i in range(cfg.depth)]
        if shared_table:
            if not all(torch.equal(t, per_layer[0]) for t in per_layer):
                raise CheckpointError("the layers' relative tables differ; export them per layer")
            out[SHARED_TABLE] = per_layer[0]
        else:
            out |= {f"blocks.{i}.attn.{TABLE}": t for i, t in enumerate(per_layer)}
    return out
