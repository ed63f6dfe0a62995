"""The pre-training losses of each stage, composed from the objectives with as few forward passes as possible, and
written once: the terms over the final streams below are used by the one-process step here and by every pipeline
stage layout (vlmo_ds.parallel.pipeline_step).

Image-text step (stage 3), per micro-batch of B pairs:
    1. the unimodal pass: image and text streams, each with the VL-expert path of the top blocks (ITC, both pairs);
    2. ITM hard negatives drawn from the ITC similarities of the global (data-parallel) batch, their images and
       texts fetched from the ranks that hold them (vlmo_ds.objectives.negatives);
    3. ONE fused pass over 4B pairs: [masked text, image] for MLM, then [text, image], [text, negative image],
       [negative text, image] for ITM. Under ZeRO-3 every pass re-gathers the parameters, so one batched fused call
       instead of the published four saves three gathers of every block.
Batch keys: image [B,C,H,W], text_ids / text_mask [B,T], mlm_ids / mlm_labels [B,T] (MLM), patch_mask [B,P] (MIM),
vtok [B,P] (MIM with visual-token targets).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmo_ds.model.vlmo import PassInputs, UnimodalOutput, VLMo
from vlmo_ds.objectives.itc import ContrastiveResult, contrastive_accuracy, contrastive_loss
from vlmo_ds.objectives.itm import itm_labels, itm_loss, sample_hard_negatives
from vlmo_ds.objectives.mim import mim_loss
from vlmo_ds.objectives.mlm import masked_lm_loss
from vlmo_ds.objectives.negatives import exchange_negatives

TERMS = ("itc", "mlm", "itm")
"""The weighted terms of the image-text loss, in the order the total sums them."""


@dataclass(frozen=True)
class LossWeights:
    """Weights of the image-text objectives (the published total is ITC + ITM + 0.25 MLM)."""

    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 0.25


def unimodal_inputs(batch: dict) -> PassInputs:
    """The unimodal (ITC) pass of an image-text batch."""
    return PassInputs(text_mask=batch["text_mask"], text_ids=batch["text_ids"], images=batch["image"])


def contrastive_terms(model: VLMo, streams: dict[str, torch.Tensor], group=None,
                      itc_local_rows: bool = False) -> tuple[dict[str, torch.Tensor], ContrastiveResult]:
    """ITC over the unimodal pass's final streams (image, text, image_vl, text_vl): ({"itc", accuracies,
    "logit_scale"}, the plain pair's similarities for the ITM draw)."""
    image, image_vl = model.itc_image(UnimodalOutput(streams["image"], streams["image_vl"]))
    text, text_vl = model.itc_text(UnimodalOutput(streams["text"], streams["text_vl"]))
    plain = contrastive_loss(image, text, model.logit_scale, group, itc_local_rows)
    vl = contrastive_loss(image_vl, text_vl, model.logit_vl_scale, group, itc_local_rows)
    out = {"itc": (plain.loss + vl.loss) / 2}
    out["itc_i2t_acc"], out["itc_t2i_acc"] = contrastive_accuracy(plain)
    out["logit_scale"] = model.logit_scale.detach().exp()
    return out, plain


def fused_inputs(batch: dict, weights: LossWeights, negatives: tuple[torch.Tensor, torch.Tensor] | None,
                 group=None, embeds: bool = True) -> PassInputs:
    """The fused pass: [MLM ; positive ; negative image ; negative text] pairs (the parts the weights ask for).
    negatives: global indices (negative image per text, negative text per image); embeds=False (a pipeline stage
    after the first): only the key mask is built, and only the negatives' masks are fetched."""
    image, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
    parts = [(batch["mlm_ids"], mask, image)] if weights.mlm else []
    if negatives is not None:
        neg_images, neg_ids, neg_mask = exchange_negatives(*negatives, image if embeds else None,
                                                           ids if embeds else None, mask, group)
        parts += [(ids, mask, image), (ids, mask, neg_images), (neg_ids, neg_mask, image)]
    ids, mask, images = zip(*parts)
    if not embeds:
        return PassInputs(text_mask=torch.cat(mask))
    return PassInputs(text_mask=torch.cat(mask), text_ids=torch.cat(ids), images=torch.cat(images))


def fused_terms(model: VLMo, fused: torch.Tensor, batch: dict, weights: LossWeights,
                tp_group=None) -> dict[str, torch.Tensor]:
    """MLM and ITM over the fused pass's final stream [4B or 3B or B, T+1+P, D]: {"mlm", "mlm_acc", "itm",
    "itm_acc"} (those the weights ask for)."""
    b, out = batch["text_ids"].shape[0], {}
    if weights.mlm:
        out["mlm"], out["mlm_acc"] = masked_lm_loss(fused[:b, : batch["text_ids"].shape[1]], batch["mlm_labels"],
                                                    model.mlm_logits, tp_group)
        fused = fused[b:]
    if weights.itm:
        out["itm"], out["itm_acc"] = itm_loss(model.itm_logits(fused), itm_labels(b, fused.device))
    return out


def weighted_total(found: dict[str, torch.Tensor], weights: LossWeights, names=TERMS) -> torch.Tensor:
    """The sum of the weighted terms present in `found` (of `names`), added in TERMS' order."""
    terms = [getattr(weights, name) * found[name] for name in TERMS if name in names and name in found]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def image_text_losses(model: VLMo, batch: dict, weights: LossWeights, seed: int, group=None,
                      itc_local_rows: bool = False, tp_group=None) -> dict[str, torch.Tensor]:
    """{"loss": weighted total, "itc", "itm", "mlm" and accuracies}; seed picks the ITM negatives of this step.

    group: the data-parallel group (ITC and ITM gathers); tp_group: the tensor-parallel group of a model built with
    vocabulary-parallel MLM logits (None: whole logits).
    """
    out: dict[str, torch.Tensor] = {}
    negatives = None
    if weights.itc or weights.itm:
        streams = model.encode("unimodal", unimodal_inputs(batch), vl_path=True)
        found, itc = contrastive_terms(model, streams, group, itc_local_rows)
        out |= found
        if weights.itm:
            negatives = sample_hard_negatives(itc, seed, batch["text_ids"].shape[0], group)
    if weights.mlm or weights.itm:
        fused = model.encode("fused", fused_inputs(batch, weights, negatives, group))["fused"]
        out |= fused_terms(model, fused, batch, weights, tp_group)
    out["loss"] = weighted_total(out, weights)
    return out


def text_mlm_inputs(batch: dict) -> PassInputs:
    """The text-only pass of a masked-text batch."""
    return PassInputs(text_mask=batch["text_mask"], text_ids=batch["mlm_ids"])


def text_mlm_terms(model: VLMo, text: torch.Tensor, batch: dict, tp_group=None) -> dict[str, torch.Tensor]:
    """MLM over the text pass's final stream [B, T, D]: {"loss", "mlm", "mlm_acc"}."""
    loss, accuracy = masked_lm_loss(text, batch["mlm_labels"], model.mlm_logits, tp_group)
    return {"loss": loss, "mlm": loss, "mlm_acc": accuracy}


def text_mlm_losses(model: VLMo, batch: dict, tp_group=None) -> dict[str, torch.Tensor]:
    """Text-only masked language modelling (stage 2): text experts only; tp_group as in image_text_losses."""
    return text_mlm_terms(model, model.encode("text", text_mlm_inputs(batch))["text"], batch, tp_group)


def mim_inputs(batch: dict) -> PassInputs:
    """The image-only pass of a masked-image batch."""
    return PassInputs(images=batch["image"], patch_mask=batch["patch_mask"])


def mim_terms(model: VLMo, image: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """MIM over the image pass's final stream [B, 1+P, D]: {"loss", "mim"} (+ "mim_acc" with visual tokens);
    pixel or visual-token targets by the model's config."""
    mask, predictions = batch["patch_mask"], model.mim_logits(image)
    if model.cfg.mim_targets == "tokens":
        loss, metric = mim_loss(predictions, mask, token_ids=batch["vtok"])
        return {"loss": loss, "mim": loss, "mim_acc": metric}
    loss, _ = mim_loss(predictions, mask, images=batch["image"], patch=model.cfg.patch_size)
    return {"loss": loss, "mim": loss}


def image_mim_losses(model: VLMo, batch: dict) -> dict[str, torch.Tensor]:
    """Masked image modelling (stage 1): image experts only."""
    return mim_terms(model, model.encode("image", mim_inputs(batch))["image"], batch)
