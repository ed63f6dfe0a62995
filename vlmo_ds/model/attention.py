"""The attention kernel, chosen once per device kind, and the per-pass inputs every block builds its bias from.

No dense bias per layer exists outside a block. A pass holds an `AttentionInputs`: the relative position index
[N, N] and the key mask [B, N] (bool, True for a real key), both at the kernel's padded length. Each block's
attention turns them and its own H columns of the relative table ([rows, H]) into scores inside its forward, so
under activation checkpointing nothing of the bias is kept between forward and backward:
    flex  (CUDA, torch's FlexAttention, compiled): the relative bias is a score modification reading
          table[index[q, k], h] (its gradient flows to the table), padding a block mask (fully padded key blocks
          are skipped); no bias tensor is made at all
    sdpa  (elsewhere): torch's scaled_dot_product_attention with one additive mask made inside the block from the
          broadcastable parts, [1, H, N, N] relative + [B, 1, 1, N] padding (0 / -inf); it lives for the block's
          call only (with checkpointing; without it autograd keeps it as the kernel's input)
Kernels that need it get the sequence padded to a multiple of 8 (fused 237 -> 240 for base): padded keys are masked
and padded query rows dropped, so results do not change. The kernel actually used is logged once (rank 0).

Shapes: B batch, H heads (local to the tensor-parallel rank), N sequence, hd head dim, R table rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernel:
    name: str
    """"flex" or "sdpa"."""
    multiple: int
    """Sequence lengths are padded to a multiple of this (1: no padding)."""


FLEX = Kernel("flex", 8)
SDPA = Kernel("sdpa", 1)
SDPA_CUDA = Kernel("sdpa", 8)  # the memory-efficient kernel reads its additive mask in 8-element aligned rows


@cache
def kernel_for(device_type: str) -> Kernel:
    """The kernel for a device kind, chosen on first use and logged once (rank 0)."""
    kernel = SDPA
    if device_type == "cuda":
        kernel = FLEX if _flex_available() else SDPA_CUDA
    if _rank() == 0:
        log.info("attention kernel on %s: %s%s", device_type, kernel.name,
                 " (relative bias as score_mod, padding as block mask)" if kernel is FLEX else
                 " (scaled_dot_product_attention, additive mask built per block)")
    return kernel


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class AttentionInputs:
    """What every block of one pass attends with: index [N', N'] (long; None without a relative bias) and key_mask
    [B, N'] (bool; None when every key is real), N' = the sequence length `length` padded for `kernel`."""

    def __init__(self, length: int, index: torch.Tensor | None, key_mask: torch.Tensor | None, kernel: Kernel,
                 device: torch.device):
        self.length, self.kernel = length, kernel
        self.padded = -(-length // kernel.multiple) * kernel.multiple
        extra = self.padded - length
        # padded rows and columns read row 0 of the table: their keys are masked, their query rows dropped
        self.index = index if index is None or not extra else F.pad(index, (0, extra, 0, extra))
        if key_mask is None and extra:
            key_mask = torch.ones(1, length, dtype=torch.bool, device=device)
        self.key_mask = None if key_mask is None else F.pad(key_mask.bool(), (0, extra), value=False)
        self._block_mask = None

    def block_mask(self, batch: int, device: torch.device):
        """FlexAttention's block mask of the key padding (made once per pass, on first use)."""
        if self._block_mask is None and self.key_mask is not None:
            from torch.nn.attention.flex_attention import create_block_mask

            keys = self.key_mask.expand(batch, -1)
            self._block_mask = create_block_mask(lambda b, h, q, k: keys[b, k], batch, None, self.padded,
                                                 self.padded, device=device)
        return self._block_mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor | None,
           inputs: AttentionInputs) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + relative bias + padding) v: q, k, v [B, H, N, hd]; table [R, H] (this block's
    columns of the relative table) or None; returns [B, H, N, hd]."""
    n = q.shape[2]
    if inputs.padded != n:
        q, k, v = (F.pad(t, (0, 0, 0, inputs.padded - n)) for t in (q, k, v))
    out = (_flex if inputs.kernel is FLEX else _sdpa)(q, k, v, table, inputs)
    return out[:, :, :n]


def _sdpa(q, k, v, table, inputs: AttentionInputs) -> torch.Tensor:
    mask = None
    if table is not None and inputs.index is not None:
        mask = F.embedding(inputs.index, table.to(q.dtype)).permute(2, 0, 1).unsqueeze(0)  # [1, H, N, N]
    if inputs.key_mask is not None:
        padding = torch.zeros(inputs.key_mask.shape, dtype=q.dtype, device=q.device)
        padding = padding.masked_fill(~inputs.key_mask, float("-inf"))[:, None, None]  # [B, 1, 1, N]
        mask = padding if mask is None else mask + padding
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(q, k, v, table, inputs: AttentionInputs) -> torch.Tensor:
    score_mod = None
    if table is not None and inputs.index is not None:
        index, bias = inputs.index, table.to(q.dtype)

        def score_mod(score, b, h, q_idx, k_idx):
            return score + bias[index[q_idx, k_idx], h]

    run = _compiled_flex() if q.is_cuda else _eager_flex()
    return run(q, k, v, score_mod=score_mod, block_mask=inputs.block_mask(q.shape[0], q.device))


def _eager_flex():
    """The uncompiled function (CPU, forward only: how the tests check the score modification and the mask)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention
