"""The MoME block: attention shared by every modality, then the feed-forward expert of the token's modality.

Shapes: B batch, N sequence, D dim, H heads (local to this tensor-parallel rank), hd head dim.
Modes:  "image" / "text": every token goes through that modality's expert;
        "fused": [text ; image] split at `text_len` - text through the text expert, image through the image expert -
                 or, in a block that has a vision-language expert, every token through it;
        "vl":    the vision-language expert for a single-modality sequence (the ITC VL path); only valid in VL blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmo_ds.model.attention import AttentionInputs, attend
from vlmo_ds.model.layers import Layers

MODES = ("image", "text", "fused", "vl")


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (scaled when kept)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """One expert FFN: fc1 (column parallel) -> GELU -> fc2 (row parallel)."""

    def __init__(self, dim: int, hidden: int, layers: Layers):
        super().__init__()
        self.fc1 = layers.column(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = layers.row(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with q/v biases (k has none), the relative position bias and key padding.

    qkv is one column-parallel linear whose local output rows are [q ; k ; v] of this rank's heads, so the same
    reshape serves every tensor-parallel size. The bias is made here, per call, from the pass's AttentionInputs and
    this block's columns of the relative table (vlmo_ds.model.attention), never kept for the pass.
    """

    def __init__(self, dim: int, heads: int, layers: Layers):
        super().__init__()
        self.local_heads = layers.local(heads, "heads")
        local_dim = self.local_heads * (dim // heads)
        self.qkv = layers.column(dim, 3 * dim, bias=False)
        self.q_bias = layers.shard_parameter(nn.Parameter(torch.zeros(local_dim)), dim=0)
        self.v_bias = layers.shard_parameter(nn.Parameter(torch.zeros(local_dim)), dim=0)
        self.proj = layers.row(dim, dim)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, table: torch.Tensor | None) -> torch.Tensor:
        """x [B, N, D]; table [rows, H] (this block's relative-table columns) or None."""
        b, n, _ = x.shape
        qkv = self.qkv(x) + torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = qkv.reshape(b, n, 3, self.local_heads, -1).permute(2, 0, 3, 1, 4)  # each [B, H, N, hd]
        out = attend(q, k, v, table, inputs)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm MoME block; attribute names follow the published checkpoint (norm2_text, mlp_imag, ...)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, with_vl: bool, drop_path: float,
                 layer_scale: float | None, eps: float, layers: Layers):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, layers)
        self.drop_path = DropPath(drop_path)
        self.norm2_text, self.mlp_text = nn.LayerNorm(dim, eps=eps), Mlp(dim, mlp_dim, layers)
        self.norm2_imag, self.mlp_imag = nn.LayerNorm(dim, eps=eps), Mlp(dim, mlp_dim, layers)
        self.with_vl = with_vl
        if with_vl:
            self.norm2_vl, self.mlp_vl = nn.LayerNorm(dim, eps=eps), Mlp(dim, mlp_dim, layers)
        if layer_scale is None:
            self.gamma_1 = self.gamma_2 = None
        else:
            self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale))
            self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale))

    def _expert(self, name: str, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self, f"mlp_{name}")(getattr(self, f"norm2_{name}")(x))
        return out if self.gamma_2 is None else self.gamma_2 * out

    def forward(self, x: torch.Tensor, mode: str, attention: AttentionInputs, table: torch.Tensor | None = None,
                text_len: int = 0) -> torch.Tensor:
        """x [B, N, D] in `mode`; attention: the pass's index and key mask; table: this block's [rows, H] columns
        of the relative table (None without relative positions); text_len: the text part of a fused sequence."""
        attn = self.attn(self.norm1(x), attention, table)
        x = x + self.drop_path(attn if self.gamma_1 is None else self.gamma_1 * attn)
        if mode == "image":
            return x + self.drop_path(self._expert("imag", x))
        if mode == "text":
            return x + self.drop_path(self._expert("text", x))
        if self.with_vl:  # "fused" or "vl"
            return x + self.drop_path(self._expert("vl", x))
        if mode == "vl":
            raise ValueError("mode 'vl' needs a block with a vision-language expert")
        text, image = x[:, :text_len], x[:, text_len:]
        text = text + self.drop_path(self._expert("text", text))
        image = image + self.drop_path(self._expert("imag", image))
        return torch.cat([text, image], dim=1)
