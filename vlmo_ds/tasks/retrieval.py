"""Retrieval fine-tuning (COCO, Flickr30K): image-text contrastive learning of the dual encoder.

The published objective ("irtr"): the image and text passes through their own experts only (no VL-expert path),
the ITC projections, and the symmetric cross-entropy over the similarities of the whole data-parallel batch scaled
by exp(logit_scale). vlmo_ds gathers the features with gradient (vlmo_ds.objectives.itc), so every rank's negatives
teach (the published code gathers without). Retrieval is then evaluated with the same features
(vlmo_ds.eval.retrieval), optionally re-ranked by the fusion encoder's ITM head (vlmo_ds.eval.rerank).

Batch keys (vlmo_ds.data.task_batches): image [B, 3, S, S], text_ids / text_mask [B, T] (one of the image's captions,
drawn per sample). Shapes: B local batch.
"""
from __future__ import annotations

import torch

from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.itc import contrastive_accuracy, contrastive_loss


def retrieval_losses(model: VLMo, batch: dict, seed: int, group=None,
                     local_rows: bool = False) -> dict[str, torch.Tensor]:
    """The stage loss function: {"loss", "itc", "itc_i2t_acc", "itc_t2i_acc", "logit_scale"}.

    group: the data-parallel group (features gathered over it); local_rows: each rank builds only its own rows of
    the logits (parallel.itc_local_rows); seed is unused.
    """
    image = model.itc_image(model.encode_image(batch["image"]))[0]  # [B, D]
    text = model.itc_text(model.encode_text(batch["text_ids"], batch["text_mask"]))[0]
    result = contrastive_loss(image, text, model.logit_scale, group, local_rows)
    i2t, t2i = contrastive_accuracy(result)
    return {"loss": result.loss, "itc": result.loss.detach(), "itc_i2t_acc": i2t, "itc_t2i_acc": t2i,
            "logit_scale": model.logit_scale.detach().exp().reshape(())}
