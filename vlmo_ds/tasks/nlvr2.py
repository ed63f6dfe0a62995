"""NLVR2 fine-tuning: one statement, two images, true or false.

As published: two passes of the fusion encoder over the same text, [text ; image 0] with image modality type 1 and
[text ; image 1] with type 2 (the type table's third row, grown from the image row when fine-tuning starts:
vlmo_ds.tasks.start), the two pooled [CLS] vectors concatenated, the NLVR2 head, cross-entropy over (False, True).

Batch keys (vlmo_ds.data.task_batches): image_0 / image_1 [B, 3, S, S] (the left and right images), text_ids /
text_mask [B, T], label [B] int64 (1 = the statement is true). Shapes: B batch, T text length, D dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.tasks.heads import NLVR2_HEAD

FIRST_IMAGE_TYPE, SECOND_IMAGE_TYPE = 1, 2


def nlvr2_logits(model: VLMo, text_ids: torch.Tensor, text_mask: torch.Tensor, image_0: torch.Tensor,
                 image_1: torch.Tensor) -> torch.Tensor:
    """[B, T], [B, T], [B, 3, S, S] x 2 -> [B, 2] logits (False, True)."""
    first = model.pooler(model.encode_pair(text_ids, text_mask, image_0, image_type=FIRST_IMAGE_TYPE))  # [B, D]
    second = model.pooler(model.encode_pair(text_ids, text_mask, image_1, image_type=SECOND_IMAGE_TYPE))
    return getattr(model, NLVR2_HEAD)(torch.cat([first, second], dim=-1))


def nlvr2_losses(model: VLMo, batch: dict, seed: int, group=None) -> dict[str, torch.Tensor]:
    """The stage loss function: {"loss", "nlvr2_ce", "nlvr2_acc"}; seed and group are unused."""
    logits = nlvr2_logits(model, batch["text_ids"], batch["text_mask"], batch["image_0"], batch["image_1"])
    labels = batch["label"]
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.detach().argmax(dim=-1) == labels).float().mean()
    return {"loss": loss, "nlvr2_ce": loss.detach(), "nlvr2_acc": accuracy}
