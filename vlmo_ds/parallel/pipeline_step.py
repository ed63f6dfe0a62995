"""The pre-training steps of a pipeline-parallel VLMo: the same numbers as vlmo_ds.objectives.pretrain on one
process, computed by stages (vlmo_ds.parallel.pipeline_stage) under megatron-core's 1F1B schedule. The passes are the
model's (stage_pass runs VLMo's pass code over the stage's blocks) and the losses are pretrain's terms, called on the
last stage with its final streams; this module only orders the passes and moves results between stages.

The image-text step and its data dependency. ITM's hard negatives are drawn from the ITC similarities, which exist
only on the last stage, and the fused ITM pass starts on the first stage. The step therefore runs two schedules:
    phase 1  the unimodal pass (image and text streams, with the VL path) of every micro-batch, forward AND backward
             of the ITC loss, 1F1B across the stages; on the last stage each micro-batch's ITC similarities give its
             negatives (sample_hard_negatives), which are broadcast to every stage (2 x B ints per micro-batch);
             each stage fetches what it needs of them from its data-parallel group (objectives.negatives: the
             first stage the images and texts it embeds, the others the texts' key masks);
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

from vlmo_ds.objectives.itm import sample_hard_negatives
from vlmo_ds.objectives.pretrain import (LossWeights, contrastive_terms, fused_inputs, fused_terms, mim_inputs,
                                         mim_terms, text_mlm_inputs, text_mlm_terms, unimodal_inputs,
                                         weighted_total)
from vlmo_ds.parallel.pipeline_schedule import broadcast_from_last_stage, run_pass
from vlmo_ds.parallel.pipeline_stage import PipelineStage


@dataclass
class PipelineStepOutput:
    metrics: dict[str, torch.Tensor]
    """Losses and accuracies (image_text_losses' keys) as 0-dim device tensors, the mean over micro-batches; equal on
    every stage."""
    negatives: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Per micro-batch: global indices [B] of a negative image for each text and a negative text for each image."""


def _device(stage: PipelineStage) -> torch.device:
    """Where the stage computes, and so where tensors broadcast between stages live (NCCL sends GPU tensors)."""
    return next(stage.parameters()).device


def _groups(dp_group, tp_group):
    dp_group = parallel_state.get_data_parallel_group() if dp_group is None else dp_group
    return dp_group, parallel_state.get_tensor_model_parallel_group() if tp_group is None else tp_group


def _metrics(stage: PipelineStage, per_micro: list[dict[str, torch.Tensor]],
             keys: list[str]) -> dict[str, torch.Tensor]:
    """The last stage's per-micro-batch values, averaged, on every stage (keys known everywhere): 0-dim device
    tensors, so that the step never waits for the device (the caller reduces them once per log interval)."""
    zero = torch.zeros((), dtype=torch.float64, device=_device(stage))
    values = torch.stack([torch.stack([found[key].detach().reshape(()).to(zero) if key in found else zero
                                       for key in keys]) for found in per_micro])  # [micro, keys]; 0 off the last
    mean = broadcast_from_last_stage(values).mean(0).float()
    return {key: mean[k] for k, key in enumerate(keys)}


def _detached(found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach() for key, value in found.items()}


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

        def itc(m: int, streams: dict) -> torch.Tensor:
            found, plain = contrastive_terms(stage, streams, dp_group, itc_local_rows)
            results[m] |= _detached(found)
            if weights.itm:
                at = sum(sizes[:m])
                drawn[:, at : at + sizes[m]] = torch.stack(sample_hard_negatives(plain, seeds[m], sizes[m], dp_group))
            return weighted_total(found, weights, ("itc",))

        run_pass(stage, "unimodal", [unimodal_inputs(mb) for mb in micro_batches], itc,
                 forward_only=not weights.itc)

    negatives = []
    if weights.itm:
        drawn = broadcast_from_last_stage(drawn)
        negatives = [tuple(part) for part in zip(*(row.split(sizes) for row in drawn))]
    keys += (["mlm", "mlm_acc"] if weights.mlm else []) + (["itm", "itm_acc"] if weights.itm else [])
    if weights.mlm or weights.itm:
        inputs = [fused_inputs(mb, weights, negatives[m] if weights.itm else None, dp_group, embeds=stage.is_first)
                  for m, mb in enumerate(micro_batches)]

        def fused(m: int, streams: dict) -> torch.Tensor:
            found = fused_terms(stage, streams["fused"], micro_batches[m], weights, tp_group)
            results[m] |= _detached(found)
            return weighted_total(found, weights, ("mlm", "itm"))

        run_pass(stage, "fused", inputs, fused)
    for found in results:  # the one-process total, summed in its order
        if found:
            found["loss"] = weighted_total(found, weights)
    return PipelineStepOutput(_metrics(stage, results, keys + ["loss"]), negatives)


def text_mlm_step(stage: PipelineStage, micro_batches: Sequence[dict], *, tp_group=None) -> PipelineStepOutput:
    """Text-only MLM (text_mlm_losses per micro-batch)."""
    _, tp_group = _groups(None, tp_group)
    results: list[dict[str, torch.Tensor]] = [{} for _ in micro_batches]

    def mlm(m: int, streams: dict) -> torch.Tensor:
        found = text_mlm_terms(stage, streams["text"], micro_batches[m], tp_group)
        results[m] = _detached(found)
        return found["loss"]

    run_pass(stage, "text", [text_mlm_inputs(mb) for mb in micro_batches], mlm)
    return PipelineStepOutput(_metrics(stage, results, ["loss", "mlm", "mlm_acc"]))


def image_mim_step(stage: PipelineStage, micro_batches: Sequence[dict]) -> PipelineStepOutput:
    """Masked image modelling (image_mim_losses per micro-batch)."""
    results: list[dict[str, torch.Tensor]] = [{} for _ in micro_batches]

    def mim(m: int, streams: dict) -> torch.Tensor:
        found = mim_terms(stage, streams["image"], micro_batches[m])
        results[m] = _detached(found)
        return found["loss"]

    run_pass(stage, "image", [mim_inputs(mb) for mb in micro_batches], mim)
    tokens = stage.cfg.mim_targets == "tokens"
    return PipelineStepOutput(_metrics(stage, results, ["loss", "mim"] + (["mim_acc"] if tokens else [])))
