"""The one place the model's linear layers and embeddings come from.

The model asks a `Layers` factory for column-parallel, row-parallel and replicated linears and for the (vocabulary
parallel) word embedding. The default factory returns plain torch modules (tensor-parallel size 1, the published
numerics and key names); a tensor-parallel factory returns megatron-core's layers with the same call signature
(input -> output tensor), so the model code never changes and holds no rank logic.
"""
from __future__ import annotations

import torch
from torch import nn


class Layers:
    """Plain torch layers (tensor-parallel size 1)."""

    tp_size: int = 1

    def local(self, n: int, what: str) -> int:
        """The share of `n` (heads, FFN width, vocabulary rows) that lives on this tensor-parallel rank."""
        if n % self.tp_size:
            raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {self.tp_size}; "
                             f"choose a tensor-parallel size that divides {what}")
        return n // self.tp_size

    def shard_parameter(self, param: nn.Parameter, dim: int) -> nn.Parameter:
        """Declare that `param` holds only this rank's share along `dim` (per-head biases, the relative table's
        head columns, the MLM output bias), so that gradient norms and checkpoints count it once per shard."""
        return param

    def column(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """Linear whose output features are split across tensor-parallel ranks."""
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """Linear whose input features are split across ranks; the output is summed over them."""
        return nn.Linear(in_features, out_features, bias=bias)

    def replicated(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """Linear held whole on every rank (small heads)."""
        return nn.Linear(in_features, out_features, bias=bias)

    def vocab_embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        """Word embedding whose rows are split across ranks."""
        return nn.Embedding(num_embeddings, dim)

    def vocab_output(self, dim: int, vocab_size: int) -> nn.Module:
        """The MLM decoder D -> vocabulary (no bias), split by vocabulary rows."""
        return nn.Linear(dim, vocab_size, bias=False)


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Truncated normal at +-2 (absolute), as the published ViT initialisation."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)
