"""The multiway transformer (the published `transformer.*` keys): image embedding, the MoME blocks, the final norm.

Its forward is the image embedding (it owns cls_token, pos_embed and mask_token, and ZeRO-3 gathers a module's own
parameters when the module is called); the blocks and the norm are called by VLMo.

Shapes: B batch, N sequence, P patches, D dim.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmo_ds.model.block import Block
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.embeddings import PatchEmbed
from vlmo_ds.model.layers import Layers, trunc_normal_


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: Layers):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(trunc_normal_(torch.zeros(1, 1, cfg.dim)))
        # base_plus uses absolute image positions instead of the relative bias.
        self.pos_embed = None if cfg.rel_pos else nn.Parameter(trunc_normal_(torch.zeros(1, cfg.image_len, cfg.dim)))
        # BEiT's [MASK] patch for masked image modelling (the image-only stage); absent from published checkpoints.
        self.mask_token = nn.Parameter(trunc_normal_(torch.zeros(1, 1, cfg.dim))) if cfg.mim_targets else None
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_dim, with_vl=i >= cfg.vlffn_start, drop_path=rates[i],
                  layer_scale=cfg.layer_scale_init, eps=cfg.ln_eps, layers=layers)
            for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1+P, D]; patch_mask [B, P] bool swaps those patches for the mask token (MIM)."""
        x = self.patch_embed(images)
        if patch_mask is not None:
            if self.mask_token is None:
                raise ValueError("masked image modelling needs a model built with mim_targets set")
            w = patch_mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x if self.pos_embed is None else x + self.pos_embed
