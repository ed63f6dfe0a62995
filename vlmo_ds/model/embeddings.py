"""Input embeddings: text (BERT-style word + segment embedding, LayerNorm) and image patches.

Attribute names follow the published checkpoint (text_embeddings.word_embeddings, transformer.patch_embed.proj, ...).
Shapes: B batch, T text length, P patches, D dim.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.layers import Layers


class TextEmbeddings(nn.Module):
    """word embedding + BERT segment-0 embedding (+ absolute position when there is no relative bias) -> LayerNorm."""

    def __init__(self, cfg: ModelConfig, layers: Layers):
        super().__init__()
        self.word_embeddings = layers.vocab_embedding(cfg.vocab_size, cfg.dim)
        self.token_type_embeddings = nn.Embedding(2, cfg.dim)
        # base_plus has no relative position bias and uses BERT's absolute positions instead.
        self.position_embeddings = None if cfg.rel_pos else nn.Embedding(cfg.max_text_len, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=1e-12)
        # The published code passes drop_path_rate as BERT's hidden dropout; we keep that coupling.
        self.dropout = nn.Dropout(cfg.drop_path_rate)
        for emb in (self.word_embeddings, self.token_type_embeddings, self.position_embeddings):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] ids -> [B, T, D]."""
        # Embeddings are called as modules, never read as .weight: ZeRO-3 gathers a module's parameters on its call.
        x = self.word_embeddings(text_ids) + self.token_type_embeddings(torch.zeros_like(text_ids))
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(text_ids.shape[1], device=text_ids.device))
        return self.dropout(self.LayerNorm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution: [B, C, H, W] -> [B, P, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])} but the model is built for "
                             f"{self.image_size}x{self.image_size}; set image_size or resize the data")
        return self.proj(images).flatten(2).transpose(1, 2)
