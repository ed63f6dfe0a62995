"""VQA fine-tuning: the fusion encoder's pooled [CLS] through the VQA head, trained with soft-score BCE.

The loss is the published one: binary cross-entropy with logits against the soft scores of every vocabulary answer
(0.3 / 0.6 / 0.9 / 1.0 by how many humans gave it), averaged over the batch and the answers, times the number of
answers (so it is the per-question sum over answers, averaged over questions). The published VQA recipes train the
head with a learning rate 20x the backbone's (vlmo_ds.tasks.optim).

Batch keys (vlmo_ds.data.task_batches): image [B, 3, S, S], text_ids / text_mask [B, T], vqa_targets [B, A]
float (soft scores, 0 for answers nobody gave). Shapes: B batch, T text length, A answers, D dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.tasks.heads import VQA_HEAD


def vqa_logits(model: VLMo, text_ids: torch.Tensor, text_mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """[B, T], [B, T], [B, 3, S, S] -> [B, A] answer logits."""
    fused = model.encode_pair(text_ids, text_mask, images)
    return getattr(model, VQA_HEAD)(model.pooler(fused))


def vqa_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The published VQA loss: mean BCE-with-logits over [B, A], times A."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


def soft_score(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean soft score of the arg-max answers: the training-time estimate of the VQA score the published code logs."""
    return targets.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()


def vqa_losses(model: VLMo, batch: dict, seed: int, group=None) -> dict[str, torch.Tensor]:
    """The stage loss function: {"loss", "vqa_bce", "vqa_score"}; seed and group are unused (no sampling, nothing
    gathered: every question is its own example)."""
    logits = vqa_logits(model, batch["text_ids"], batch["text_mask"], batch["image"])
    loss = vqa_bce(logits, batch["vqa_targets"])
    return {"loss": loss, "vqa_bce": loss.detach(), "vqa_score": soft_score(logits.detach(), batch["vqa_targets"])}
