"""Image-text matching with hard negatives drawn from the ITC similarities of the whole data-parallel batch.

For every text one negative image, for every image one negative text, each drawn with probability
softmax(similarity) over the global batch with the positive excluded (the published rule). The draw is Gumbel-max
with the noise of global row r drawn from a generator seeded by (seed, r): every layout (one process, several
data-parallel ranks, full or local ITC rows) draws exactly the same negatives for the same pair.
Shapes: B local batch, N global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmo_ds.objectives.itc import ContrastiveResult
from vlmo_ds.parallel.collectives import group_rank


def _row_noise(seed: int, row: int, n: int) -> torch.Tensor:
    """[2, n] Gumbel noise of global row `row` (one line for the negative image, one for the negative text)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + row) % (2**63))
    u = torch.rand(2, n, generator=gen, dtype=torch.float64).clamp_(1e-20, 1.0)
    return -torch.log(-torch.log(u))


def sample_hard_negatives(itc: ContrastiveResult, seed: int, local_batch: int,
                          group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global indices [B] of (a negative image for each local text, a negative text for each local image)."""
    n = itc.i2t.shape[1]
    if n < 2:
        raise ValueError("ITM hard negatives need a global batch of at least 2 pairs")
    start = group_rank(group) * local_batch
    rows = slice(start - itc.row_offset, start - itc.row_offset + local_batch)
    noise = torch.stack([_row_noise(seed, r, n) for r in range(start, start + local_batch)])  # [B, 2, N]
    local = torch.arange(local_batch)
    positives = local + start

    def draw(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        scores = F.log_softmax(logits[rows].detach().double().cpu(), dim=-1) + noise
        scores[local, positives] = float("-inf")
        return scores.argmax(-1).to(logits.device)

    return draw(itc.t2i, noise[:, 0]), draw(itc.i2t, noise[:, 1])


def itm_labels(batch: int, device: torch.device) -> torch.Tensor:
    """[3B] labels of the fused ITM batch [positive pairs ; negative images ; negative texts]."""
    labels = torch.zeros(3 * batch, dtype=torch.long, device=device)
    labels[:batch] = 1
    return labels


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy)."""
    return F.cross_entropy(logits.float(), labels), (logits.argmax(-1) == labels).float().mean().detach()
