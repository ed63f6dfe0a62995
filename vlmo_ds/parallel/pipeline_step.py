"""The pre-training losses of a pipeline-parallel VLMo: the same numbers as vlmo_ds.objectives.pretrain on one
process, computed by stages (vlmo_ds.parallel.pipeline_stage) under megatron-core's 1F1B schedule.

The image-text step and its data dependency. ITM's hard negatives are drawn from the ITC similarities, which exist
only on the last stage, and the fused ITM pass starts on the first stage. The step therefore runs two schedules:
    phase 1  the unimodal pass (image and text streams, with the VL path) of every micro-batch, forward AND backward
             of the ITC loss, 1F1B across the stages; on the last stage each micro-batch's ITC similarities give its
             negatives (sample_hard_negatives), which are broadcast to every stage (2 x B ints per micro-batch);
    phase 2  one fused pass of every micro-batch ([masked text, image] for MLM; positive, negative-image and
             negative-text pairs for ITM), forward and backward of weight_mlm * MLM + weight_itm * ITM.
The negatives are drawn without gradient, so the total loss's gradient is the sum of the two phases' gradients and
ITC's backward can run before the fused pass exists: no activation is kept across phases, nothing is recomputed, and
the step does exactly the forward work of the one-process step, 3D + 2(D - S) block calls per micro-batch for D
blocks and VL experts from block S (vlmo_ds.parallel.pipeline_passes; the multi-process tests count it). The price
is one more pipeline fill and drain per step (each schedule idles P - 1 micro-batch slots per stage for P stages)
and a broadcast of 2B indices per micro-batch. The alternative, a no-grad pass of the plain image and text paths for
the negatives and then one schedule of everything, has one fill and drain but adds 2D block calls per micro-batch:
+57% forward work for the tiny model (3.5 -> 5.5 passes), +60% for base (3.33 -> 5.33).

Micro-batches are the gradient-accumulation micro-batches of one optimizer step: each has its own ITC batch (over
the data-parallel group, as on one process) and its own negatives seed. Gradients accumulate into .grad as the mean
over micro-batches; the data-parallel reduction and the optimizer step are the caller's (DeepSpeed ZeRO 0/1).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from vlmo_ds.objectives.itc import contrastive_accuracy, contrastive_loss
from vlmo_ds.objectives.itm import itm_labels, itm_loss, sample_hard_negatives
from vlmo_ds.objectives.mim import mim_loss
from vlmo_ds.objectives.mlm import masked_lm_loss
from vlmo_ds.objectives.pretrain import LossWeights
from vlmo_ds.parallel.collectives import all_gather_nograd
from vlmo_ds.parallel.pipeline_schedule import broadcast_from_last_stage, run_pass
from vlmo_ds.parallel.pipeline_stage import PassInputs, PipelineStage


@dataclass
class PipelineStepOutput:
    metrics: dict[str, float]
    """Losses and accuracies (image_text_losses' keys), the mean over micro-batches; equal on every stage."""
    negatives: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Per micro-batch: global indices [B] of a negative image for each text and a negative text for each image."""


def _device(stage: PipelineStage) -> torch.device:
    """Where the stage computes, and so where tensors broadcast between stages live (NCCL sends GPU tensors)."""
    return next(stage.parameters()).device


def _groups(dp_group, tp_group):
    dp_group = parallel_state.get_data_parallel_group() if dp_group is None else dp_group
    return dp_group, parallel_state.get_tensor_model_parallel_group() if tp_group is None else tp_group


def _metrics(stage: PipelineStage, per_micro: list[dict[str, torch.Tensor]], keys: list[str]) -> dict[str, float]:
    """The last stage's per-micro-batch values, averaged, on every stage (keys known everywhere)."""
    values = torch.zeros(len(per_micro), len(keys), dtype=torch.float64, device=_device(stage))
    for m, found in enumerate(per_micro):
        for k, key in enumerate(keys):
            values[m, k] = float(found[key]) if key in found else 0.0
    return dict(zip(keys, broadcast_from_last_stage(values).mean(0).tolist()))


def image_text_step(stage: PipelineStage, micro_batches: Sequence[dict], weights: LossWeights,
                    seeds: Sequence[int], *, dp_group=None, tp_group=None,
                    itc_local_rows: bool = False) -> PipelineStepOutput:
    """ITC + ITM with hard negatives + MLM for one optimizer step (image_text_losses per micro-batch).

    micro_batches: image_text_losses' batch dicts, the same on every stage of a replica; seeds: ITM negatives seed per
    micro-batch; dp_group / tp_group: megatron's groups when None.
    """
    if len(seeds) != len(micro_batches):
        raise ValueError(f"image_text_step needs one seed per micro-batch, got {len(seeds)} for {len(micro_batches)}")
    dp_group, tp_group = _groups(dp_group, tp_group)
    results: list[dict[str, torch.Tensor]] = [{} for _ in micro_batches]
    sizes = [mb["text_ids"].shape[0] for mb in micro_batches]
    keys = []
    # [negative image ; negative text] of every micro-batch
    drawn = torch.zeros(2, sum(sizes), dtype=torch.long, device=_device(stage))

    if weights.itc or weights.itm:
        keys += ["itc", "itc_i2t_acc", "itc_t2i_acc", "logit_scale"]

        def itc(m: int, out: dict) -> torch.Tensor:
            image, image_vl = stage.itc_image(out["image"], out["image_vl"])
            text, text_vl = stage.itc_text(out["text"], out["text_vl"])
            plain = contrastive_loss(image, text, stage.logit_scale, dp_group, itc_local_rows)
            vl = contrastive_loss(image_vl, text_vl, stage.logit_vl_scale, dp_group, itc_local_rows)
            loss = (plain.loss + vl.loss) / 2
            results[m]["itc"] = loss.detach()
            results[m]["itc_i2t_acc"], results[m]["itc_t2i_acc"] = contrastive_accuracy(plain)
            results[m]["logit_scale"] = stage.logit_scale.detach().exp()
            if weights.itm:
                at = sum(sizes[:m])
                drawn[:, at : at + sizes[m]] = torch.stack(sample_hard_negatives(plain, seeds[m], sizes[m], dp_group))
            return weights.itc * loss

        inputs = [PassInputs(text_mask=mb["text_mask"], text_ids=mb["text_ids"], images=mb["image"])
                  for mb in micro_batches]
        run_pass(stage, "unimodal", inputs, itc, forward_only=not weights.itc)

    negatives = []
    if weights.itm:
        drawn = broadcast_from_last_stage(drawn)
        negatives = [tuple(part) for part in zip(*(row.split(sizes) for row in drawn))]
    if weights.mlm:
        keys += ["mlm", "mlm_acc"]
    if weights.itm:
        keys += ["itm", "itm_acc"]
    if weights.mlm or weights.itm:
        inputs = [_fused_inputs(stage, mb, weights, negatives[m] if weights.itm else None, dp_group)
                  for m, mb in enumerate(micro_batches)]

        def fused(m: int, out: dict) -> torch.Tensor:
            hidden, b = out["fused"], sizes[m]
            total = hidden.new_zeros(())
            if weights.mlm:
                t = micro_batches[m]["text_ids"].shape[1]
                mlm, results[m]["mlm_acc"] = masked_lm_loss(hidden[:b, :t], micro_batches[m]["mlm_labels"],
                                                            stage.mlm_logits, tp_group)
                results[m]["mlm"] = mlm.detach()
                total = total + weights.mlm * mlm
                hidden = hidden[b:]
            if weights.itm:
                itm, results[m]["itm_acc"] = itm_loss(stage.itm_logits(hidden), itm_labels(b, hidden.device))
                results[m]["itm"] = itm.detach()
                total = total + weights.itm * itm
            return total

        run_pass(stage, "fused", inputs, fused)
    for found in results:  # the one-process total, summed in its order
        if found:
            total = torch.zeros((), device=_device(stage))
            for name in ("itc", "mlm", "itm"):
                if name in found:
                    total = total + getattr(weights, name) * found[name]
            found["loss"] = total
    return PipelineStepOutput(_metrics(stage, results, keys + ["loss"]), negatives)


def _fused_inputs(stage: PipelineStage, mb: dict, weights: LossWeights, negatives, dp_group) -> PassInputs:
    """The fused batch of image_text_losses: [MLM ; positive ; negative image ; negative text] pairs. Every stage
    builds the text mask (its attention bias); only the first stage gathers images and ids from the DP group."""
    first = stage.is_first
    image, ids, mask = mb["image"], mb["text_ids"], mb["text_mask"]
    parts = [(mb["mlm_ids"] if first else None, mask, image if first else None)] if weights.mlm else []
    if negatives is not None:
        neg_image, neg_text = negatives
        all_mask = all_gather_nograd(mask, dp_group)
        all_ids = all_gather_nograd(ids, dp_group) if first else None
        all_images = all_gather_nograd(image, dp_group) if first else None
        parts += [(ids, mask, image), (ids, mask, all_images[neg_image] if first else None),
                  (all_ids[neg_text] if first else None, all_mask[neg_text], image)]
    columns = list(zip(*parts))
    mask = torch.cat(columns[1])
    if not first:
        return PassInputs(text_mask=mask)
    return PassInputs(text_mask=mask, text_ids=torch.cat(columns[0]), images=torch.cat(columns[2]))


def text_mlm_step(stage: PipelineStage, micro_batches: Sequence[dict], *, tp_group=None) -> PipelineStepOutput:
    """Text-only MLM (text_mlm_losses per micro-batch)."""
    _, tp_group = _groups(None, tp_group)
    results: list[dict[str, torch.Tensor]] = [{} for _ in micro_batches]

    def mlm(m: int, out: dict) -> torch.Tensor:
        loss, results[m]["mlm_acc"] = masked_lm_loss(out["text"], micro_batches[m]["mlm_labels"],
                                                     stage.mlm_logits, tp_group)
        results[m]["mlm"] = results[m]["loss"] = loss.detach()
        return loss

    inputs = [PassInputs(text_mask=mb["text_mask"], text_ids=mb["mlm_ids"]) for mb in micro_batches]
    run_pass(stage, "text", inputs, mlm)
    return PipelineStepOutput(_metrics(stage, results, ["loss", "mlm", "mlm_acc"]))


def image_mim_step(stage: PipelineStage, micro_batches: Sequence[dict]) -> PipelineStepOutput:
    """Masked image modelling (image_mim_losses per micro-batch)."""
    results: list[dict[str, torch.Tensor]] = [{} for _ in micro_batches]
    tokens = stage.cfg.mim_targets == "tokens"

    def mim(m: int, out: dict) -> torch.Tensor:
        mb = micro_batches[m]
        predictions = stage.mim_logits(out["image"])
        if tokens:
            loss, results[m]["mim_acc"] = mim_loss(predictions, mb["patch_mask"], token_ids=mb["vtok"])
        else:
            loss, _ = mim_loss(predictions, mb["patch_mask"], images=mb["image"], patch=stage.cfg.patch_size)
        results[m]["mim"] = results[m]["loss"] = loss.detach()
        return loss

    inputs = [PassInputs(images=mb["image"], patch_mask=mb["patch_mask"]) for mb in micro_batches]
    run_pass(stage, "image", inputs, mim)
    return PipelineStepOutput(_metrics(stage, results, ["loss", "mim"] + (["mim_acc"] if tokens else [])))
