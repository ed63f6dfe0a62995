"""Image-text matching with hard negatives drawn from the ITC similarities of the whole data-parallel batch.

For every text one negative image, for every image one negative text, each drawn with probability
softmax(similarity) over the global batch with the positive excluded (the published rule). The draw is Gumbel-max
on the logits' device, with no host synchronisation: the noise of (global row, column) is a counter-based hash of
(seed, which draw, row, column), computed with 32-bit integer arithmetic held in int64 tensors (the same bits on
CPU and CUDA), so every layout (one process, several data-parallel ranks, full or local ITC rows, TP, PP) draws
exactly the same negatives for the same pair, and any rank can draw another rank's rows. Uniforms carry 52 bits;
log-softmax and Gumbel noise are float64, so close logits are not decided by the noise's rounding.
Shapes: B local batch, N global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmo_ds.objectives.itc import ContrastiveResult
from vlmo_ds.parallel.collectives import group_rank

_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32): two 16-bit halves of c, so no product leaves int64's range."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """A bijective 32-bit integer hash (Wellons' lowbias32 constants) of x in [0, 2**32); ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: int, which: int, rows: torch.Tensor, n: int) -> torch.Tensor:
    """[len(rows), n] float64 Gumbel noise of global rows `rows` (int64, on the target device) over n columns;
    `which` tells the draws apart (0: negative images, 1: negative texts)."""
    key = _mix32(_mix32((seed & _MASK32) ^ _mix32((seed >> 32) & _MASK32)) ^ which)
    row_key = _mix32(key ^ rows)[:, None]  # [R, 1]
    cols = torch.arange(n, device=rows.device)[None]  # [1, N]
    hi = _mix32(_mix32(row_key ^ cols) ^ 1) >> 6  # two independent 26-bit halves of one 52-bit uniform
    lo = _mix32(_mix32(row_key ^ cols) ^ 2) >> 6
    u = ((hi << 26) + lo).double().add_(0.5).mul_(2.0 ** -52)  # in (0, 1), exact in float64
    return -torch.log(-torch.log(u))


def sample_hard_negatives(itc: ContrastiveResult, seed: int, local_batch: int,
                          group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global indices [B] of (a negative image for each local text, a negative text for each local image), on the
    logits' device."""
    n = itc.i2t.shape[1]
    if n < 2:
        raise ValueError("ITM hard negatives need a global batch of at least 2 pairs")
    start = group_rank(group) * local_batch
    rows = slice(start - itc.row_offset, start - itc.row_offset + local_batch)
    device = itc.i2t.device
    positives = torch.arange(start, start + local_batch, device=device)  # [B] global rows, also their positives
    own = positives[:, None] == torch.arange(n, device=device)[None]  # [B, N]

    def draw(logits: torch.Tensor, which: int) -> torch.Tensor:
        scores = F.log_softmax(logits[rows].detach().double(), dim=-1) + gumbel_noise(seed, which, positives, n)
        return scores.masked_fill_(own, float("-inf")).argmax(-1)

    return draw(itc.t2i, 0), draw(itc.i2t, 1)


def itm_labels(batch: int, device: torch.device) -> torch.Tensor:
    """[3B] labels of the fused ITM batch [positive pairs ; negative images ; negative texts]."""
    labels = torch.zeros(3 * batch, dtype=torch.long, device=device)
    labels[:batch] = 1
    return labels


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy)."""
    return F.cross_entropy(logits.float(), labels), (logits.argmax(-1) == labels).float().mean().detach()
