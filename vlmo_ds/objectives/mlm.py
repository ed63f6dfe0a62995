"""Masked language modelling loss, computed only at the masked positions.

The head runs on the [M, D] rows that carry a label instead of all [B, T, D]: the same numbers for a fraction of
the vocabulary projection (15% of tokens), which dominates the head's cost at V = 30522.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def masked_lm_loss(text_hidden: torch.Tensor, labels: torch.Tensor,
                   head: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) over positions with labels != -100. text_hidden [B, T, D], labels [B, T]."""
    picked = labels != -100
    targets = labels[picked]
    if targets.numel() == 0:  # keeps the graph (and the parameter set every rank reduces) the same as usual
        zero = head(text_hidden[:, :1]).sum() * 0.0
        return zero, zero.detach()
    logits = head(text_hidden[picked])  # [M, V]
    loss = F.cross_entropy(logits.float(), targets)
    accuracy = (logits.argmax(-1) == targets).float().mean().detach()
    return loss, accuracy
