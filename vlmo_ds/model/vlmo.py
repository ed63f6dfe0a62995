"""VLMo: one MoME transformer used as an image encoder, a text encoder (the dual encoder for retrieval and ITC) and a
fusion encoder over [text ; I_CLS ; patches] (ITM, MLM, VQA, NLVR2).

Shapes: B batch, T text length (fixed, padded), P patches, D dim, V vocabulary.
Module and parameter names are those of the published checkpoint, so its state dict maps onto ours key for key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlmo_ds.model import relative_position as rp
from vlmo_ds.model.backbone import Backbone
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.embeddings import TextEmbeddings
from vlmo_ds.model.heads import MLMHead, Pooler, Projection
from vlmo_ds.model.layers import Layers


@dataclass
class UnimodalOutput:
    hidden: torch.Tensor
    """[B, N, D] after the final norm, through the modality's own experts."""
    vl_hidden: torch.Tensor | None
    """[B, N, D] after the final norm, top blocks re-run with the VL expert (the second ITC path); None if not asked."""


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] 1/0 key mask -> [B, 1, 1, N] additive bias (0 or -inf)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, float("-inf"))[:, None, None]


class VLMo(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: Layers | None = None):
        super().__init__()
        layers = layers or Layers()
        self.cfg = cfg
        d = cfg.dim
        self.transformer = Backbone(cfg, layers)
        if cfg.rel_pos:
            local_heads = layers.local(cfg.heads, "heads")
            rows = rp.num_rows(cfg.window, cfg.table_text_len)
            # [rows, depth * local heads]: layer l's columns are [l*h, (l+1)*h) for this rank's h heads.
            self.relative_position_bias_table = layers.shard_parameter(
                nn.Parameter(torch.zeros(rows, cfg.depth * local_heads)), dim=1)
            # Derived from the config, never saved: the published files' copies are ignored on import.
            self.register_buffer("image_index", rp.image_index(cfg.window), persistent=False)
            self.register_buffer("text_index", rp.text_index(cfg.max_text_len, cfg.window, cfg.table_text_len),
                                 persistent=False)
            self.register_buffer("fused_index", rp.fused_index(cfg.max_text_len, cfg.window, cfg.table_text_len),
                                 persistent=False)
        self.text_embeddings = TextEmbeddings(cfg, layers)
        self.token_type_embeddings = nn.Embedding(cfg.num_modality_types, d)
        self.pooler = Pooler(d, layers)
        self.itm_score = Projection(d, 2, bias=True, layers=layers)
        self.itc_text_proj = Projection(d, d, bias=False, layers=layers)
        self.itc_image_proj = Projection(d, d, bias=False, layers=layers)
        self.itc_vl_text_proj = Projection(d, d, bias=False, layers=layers)
        self.itc_vl_image_proj = Projection(d, d, bias=False, layers=layers)
        # Shape [1], not the published [] (export restores it): DeepSpeed broadcasts parameters viewed as bytes,
        # which a 0-dim tensor cannot be.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.logit_vl_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.mlm_score = MLMHead(d, cfg.vocab_size, layers)
        if cfg.mim_targets:
            out = cfg.mim_vocab_size if cfg.mim_targets == "tokens" else cfg.patch_size**2 * cfg.in_chans
            self.mim_head = layers.replicated(d, out)
        for module in (self.token_type_embeddings, self.pooler, self.itm_score, self.itc_text_proj,
                       self.itc_image_proj, self.itc_vl_text_proj, self.itc_vl_image_proj, self.mlm_score,
                       getattr(self, "mim_head", None)):
            if module is not None:
                _init_normal(module)

    def forward(self, objective: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `objective(self, *args, **kwargs)`: a training step enters the model here, once.

        The objectives call several paths (image, text, fused) per step; entering through forward lets DeepSpeed's
        ZeRO-3 hooks see the top-level parameters (relative table, logit scales) for the whole step.
        """
        return objective(self, *args, **kwargs)

    # ---- attention biases -------------------------------------------------------------------------------------
    def layer_biases(self, index_name: str, key_mask: torch.Tensor | None, dtype: torch.dtype) -> list:
        """Per block: [B|1, H, N, N] relative position bias + padding bias (None when there is neither)."""
        pad = None if key_mask is None else padding_bias(key_mask, dtype)
        if not self.cfg.rel_pos:
            return [pad] * self.cfg.depth
        index = getattr(self, index_name)
        rel = F.embedding(index, self.relative_position_bias_table).to(dtype)  # [N, N, depth * H]
        rel = rel.permute(2, 0, 1).unsqueeze(0)  # [1, depth * H, N, N]
        per_layer = rel.chunk(self.cfg.depth, dim=1)
        return list(per_layer) if pad is None else [r + pad for r in per_layer]

    def run_blocks(self, x: torch.Tensor, biases: list, mode: str, start: int = 0, end: int | None = None,
                   text_len: int = 0) -> torch.Tensor:
        for i in range(start, self.cfg.depth if end is None else end):
            x = self.transformer.blocks[i](x, biases[i], mode, text_len)
        return x

    # ---- embeddings ---------------------------------------------------------------------------------------------
    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, D] with the text modality type."""
        return self.text_embeddings(text_ids) + self.token_type_embeddings(torch.zeros_like(text_ids))

    def embed_image(self, images: torch.Tensor, image_type: int = 1,
                    patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1+P, D] with modality type `image_type` (2 for the second NLVR2 image)."""
        x = self.transformer(images, patch_mask)
        return x + self.token_type_embeddings(torch.full(x.shape[:2], image_type, device=x.device))

    # ---- the three paths ------------------------------------------------------------------------------------------
    def _unimodal(self, x: torch.Tensor, biases: list, mode: str, vl_path: bool) -> UnimodalOutput:
        split = self.cfg.vlffn_start
        below = self.run_blocks(x, biases, mode, end=split)
        top = self.run_blocks(below, biases, mode, start=split)
        vl = self.run_blocks(below, biases, "vl", start=split) if vl_path else None
        norm = self.transformer.norm
        return UnimodalOutput(norm(top), None if vl is None else norm(vl))

    def encode_image(self, images: torch.Tensor, vl_path: bool = False,
                     patch_mask: torch.Tensor | None = None) -> UnimodalOutput:
        """Image only, through the image experts: hidden [B, 1+P, D] (I_CLS first)."""
        x = self.embed_image(images, patch_mask=patch_mask)
        return self._unimodal(x, self.layer_biases("image_index", None, x.dtype), "image", vl_path)

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor, vl_path: bool = False) -> UnimodalOutput:
        """Text only, through the text experts: hidden [B, T, D] (T_CLS first)."""
        x = self.embed_text(text_ids)
        return self._unimodal(x, self.layer_biases("text_index", text_mask, x.dtype), "text", vl_path)

    def encode_pair(self, text_ids: torch.Tensor, text_mask: torch.Tensor, images: torch.Tensor,
                    image_type: int = 1) -> torch.Tensor:
        """Fusion encoder over [text ; I_CLS ; patches]: [B, T+1+P, D] after the final norm."""
        text = self.embed_text(text_ids)
        image = self.embed_image(images, image_type)
        x = torch.cat([text, image], dim=1)
        key_mask = torch.cat([text_mask, text_mask.new_ones(image.shape[:2])], dim=1)
        biases = self.layer_biases("fused_index", key_mask, x.dtype)
        return self.transformer.norm(self.run_blocks(x, biases, "fused", text_len=text.shape[1]))

    # ---- heads ------------------------------------------------------------------------------------------------------
    def itc_image(self, out: UnimodalOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """L2-normalised ITC image features [B, D] of both paths (the VL one None when not computed)."""
        return _itc(self.itc_image_proj, out.hidden), _itc(self.itc_vl_image_proj, out.vl_hidden)

    def itc_text(self, out: UnimodalOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _itc(self.itc_text_proj, out.hidden), _itc(self.itc_vl_text_proj, out.vl_hidden)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """[B, T+1+P, D] -> [B, 2] (not matched, matched)."""
        return self.itm_score(self.pooler(fused))

    def mlm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T, V]."""
        return self.mlm_score(text_hidden)

    def mim_logits(self, image_hidden: torch.Tensor) -> torch.Tensor:
        """[B, 1+P, D] -> [B, P, targets] (pixels of a patch, or visual-token logits)."""
        return self.mim_head(image_hidden[:, 1:])


def _itc(proj: nn.Module, hidden: torch.Tensor | None) -> torch.Tensor | None:
    return None if hidden is None else F.normalize(proj(hidden[:, 0]), dim=-1)


def _init_normal(module: nn.Module) -> None:
    """The published heads' initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
