"""The pre-training losses of each stage, composed from the objectives with as few forward passes as possible.

Image-text step (stage 3), per micro-batch of B pairs:
    1. image-only pass and text-only pass, each with the VL-expert path of the top blocks (ITC, both feature pairs);
    2. ITM hard negatives drawn from the ITC similarities of the global (data-parallel) batch;
    3. ONE fused pass over 4B pairs: [masked text, image] for MLM, then [text, image], [text, negative image],
       [negative text, image] for ITM. Under ZeRO-3 every pass re-gathers the parameters, so one batched fused call
       instead of the published four saves three gathers of every block.
Batch keys: image [B,C,H,W], text_ids / text_mask [B,T], mlm_ids / mlm_labels [B,T] (MLM), patch_mask [B,P] (MIM),
vtok [B,P] (MIM with visual-token targets).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.itc import contrastive_accuracy, contrastive_loss
from vlmo_ds.objectives.itm import itm_labels, itm_loss, sample_hard_negatives
from vlmo_ds.objectives.mim import mim_loss
from vlmo_ds.objectives.mlm import masked_lm_loss
from vlmo_ds.parallel.collectives import all_gather_nograd


@dataclass(frozen=True)
class LossWeights:
    """Weights of the image-text objectives (the published total is ITC + ITM + 0.25 MLM)."""

    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 0.25


def image_text_losses(model: VLMo, batch: dict, weights: LossWeights, seed: int, group=None,
                      itc_local_rows: bool = False, tp_group=None) -> dict[str, torch.Tensor]:
    """{"loss": weighted total, "itc", "itm", "mlm" and accuracies}; seed picks the ITM negatives of this step.

    group: the data-parallel group (ITC and ITM gathers); tp_group: the tensor-parallel group of a model built with
    vocabulary-parallel MLM logits (None: whole logits).
    """
    image, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
    b = ids.shape[0]
    out: dict[str, torch.Tensor] = {}
    total = image.new_zeros(())
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # fused (text ids, text mask, images)
    if weights.mlm:
        parts.append((batch["mlm_ids"], mask, image))
    if weights.itc or weights.itm:
        image_feats, image_vl = model.itc_image(model.encode_image(image, vl_path=True))
        text_feats, text_vl = model.itc_text(model.encode_text(ids, mask, vl_path=True))
        itc = contrastive_loss(image_feats, text_feats, model.logit_scale, group, itc_local_rows)
        itc_vl = contrastive_loss(image_vl, text_vl, model.logit_vl_scale, group, itc_local_rows)
        out["itc"] = (itc.loss + itc_vl.loss) / 2
        out["itc_i2t_acc"], out["itc_t2i_acc"] = contrastive_accuracy(itc)
        out["logit_scale"] = model.logit_scale.detach().exp()
        total = total + weights.itc * out["itc"]
    if weights.itm:
        neg_image, neg_text = sample_hard_negatives(itc, seed, b, group)
        all_images, all_ids, all_mask = (all_gather_nograd(t, group) for t in (image, ids, mask))
        parts += [(ids, mask, image), (ids, mask, all_images[neg_image]),
                  (all_ids[neg_text], all_mask[neg_text], image)]
    if parts:
        fused = model.encode_pair(*(torch.cat(column) for column in zip(*parts)))
        if weights.mlm:
            out["mlm"], out["mlm_acc"] = masked_lm_loss(fused[:b, : ids.shape[1]], batch["mlm_labels"],
                                                        model.mlm_logits, tp_group)
            total = total + weights.mlm * out["mlm"]
            fused = fused[b:]
        if weights.itm:
            out["itm"], out["itm_acc"] = itm_loss(model.itm_logits(fused), itm_labels(b, fused.device))
            total = total + weights.itm * out["itm"]
    out["loss"] = total
    return out


def text_mlm_losses(model: VLMo, batch: dict, tp_group=None) -> dict[str, torch.Tensor]:
    """Text-only masked language modelling (stage 2): text experts only; tp_group as in image_text_losses."""
    hidden = model.encode_text(batch["mlm_ids"], batch["text_mask"]).hidden
    loss, accuracy = masked_lm_loss(hidden, batch["mlm_labels"], model.mlm_logits, tp_group)
    return {"loss": loss, "mlm": loss, "mlm_acc": accuracy}


def image_mim_losses(model: VLMo, batch: dict) -> dict[str, torch.Tensor]:
    """Masked image modelling (stage 1): image experts only; pixel or visual-token targets by the model's config."""
    mask = batch["patch_mask"]
    hidden = model.encode_image(batch["image"], patch_mask=mask).hidden
    predictions = model.mim_logits(hidden)
    if model.cfg.mim_targets == "tokens":
        loss, metric = mim_loss(predictions, mask, token_ids=batch["vtok"])
        return {"loss": loss, "mim": loss, "mim_acc": metric}
    loss, metric = mim_loss(predictions, mask, images=batch["image"], patch=model.cfg.patch_size)
    return {"loss": loss, "mim": loss}
