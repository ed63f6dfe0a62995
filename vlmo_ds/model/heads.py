"""Pre-training heads; attribute names follow the published checkpoint (pooler.dense, mlm_score.transform.dense, ...).

Shapes: B batch, T text length, D dim, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmo_ds.model.layers import Layers


class Pooler(nn.Module):
    """tanh(dense(x[:, 0])): the [CLS] summary of a fused sequence, [B, N, D] -> [B, D]."""

    def __init__(self, dim: int, layers: Layers):
        super().__init__()
        self.dense = layers.replicated(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class Projection(nn.Module):
    """A bias-free linear (the ITC projections) or a small classifier (ITM): kept as `.fc` for the published keys."""

    def __init__(self, dim: int, out: int, bias: bool, layers: Layers):
        super().__init__()
        self.fc = layers.replicated(dim, out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MLMTransform(nn.Module):
    """BERT's prediction-head transform: dense -> GELU -> LayerNorm(1e-12)."""

    def __init__(self, dim: int, layers: Layers):
        super().__init__()
        self.dense = layers.replicated(dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """[B, T, D] -> [B, T, V] (V local to the tensor-parallel rank); the decoder is not tied to the word embedding."""

    def __init__(self, dim: int, vocab_size: int, layers: Layers):
        super().__init__()
        self.transform = MLMTransform(dim, layers)
        self.decoder = layers.vocab_output(dim, vocab_size)
        self.bias = layers.shard_parameter(nn.Parameter(torch.zeros(layers.local(vocab_size, "vocab_size"))), dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias
