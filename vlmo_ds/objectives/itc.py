"""Image-text contrastive loss over the whole data-parallel batch.

Shapes: B local batch, N = B * data-parallel size, D feature dim. Features are L2-normalised.
Features are gathered with gradient (the published code gathers without, so other ranks' rows teach nothing), in
data-parallel rank order, so rank r's rows are [r*B, (r+1)*B) of the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmo_ds.parallel.collectives import all_gather_with_grad, group_rank


@dataclass
class ContrastiveResult:
    loss: torch.Tensor
    """Scalar; data-parallel averaging of gradients (and of this value over ranks) gives the global loss."""
    i2t: torch.Tensor
    """[rows, N] image-to-text logits; rows = N, or B with local_rows."""
    t2i: torch.Tensor
    """[rows, N] text-to-image logits."""
    row_offset: int
    """Global index of the first row (0, or rank * B with local_rows): row i's positive is column row_offset + i."""


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, group=None,
                     local_rows: bool = False) -> ContrastiveResult:
    """Symmetric cross-entropy over image-text similarities scaled by exp(logit_scale).

    local_rows=False: every rank builds the full [N, N] logits and the global loss.
    local_rows=True:  every rank builds only its B rows against all N columns ([B, N], B/N of the work and memory);
                      its loss is the mean over its rows, and the data-parallel average is the global loss.
    """
    all_image = all_gather_with_grad(image, group)
    all_text = all_gather_with_grad(text, group)
    scale = logit_scale.exp()
    if local_rows:
        offset = group_rank(group) * image.shape[0]
        i2t, t2i = scale * image @ all_text.T, scale * text @ all_image.T
    else:
        offset = 0
        i2t = scale * all_image @ all_text.T
        t2i = i2t.T
    labels = torch.arange(offset, offset + i2t.shape[0], device=i2t.device)
    loss = (F.cross_entropy(i2t.float(), labels) + F.cross_entropy(t2i.float(), labels)) / 2
    return ContrastiveResult(loss, i2t, t2i, offset)


def contrastive_accuracy(result: ContrastiveResult) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of rows whose top logit is the positive: (image->text, text->image)."""
    labels = torch.arange(result.row_offset, result.row_offset + result.i2t.shape[0], device=result.i2t.device)
    return ((result.i2t.argmax(-1) == labels).float().mean(), (result.t2i.argmax(-1) == labels).float().mean())
