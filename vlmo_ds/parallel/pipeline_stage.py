"""One pipeline stage of VLMo: a contiguous range of MoME blocks, the embeddings on the first stage, the final norm and
every head on the last.

A stage is a VLMo holding only its part, cut out of a built one (`PipelineStage(model, stage, stages)`), and it runs
the model's own pass code over its block range (VLMo.embed / run_blocks / final_norm) and the model's own heads;
this module only cuts the model and moves streams between stages. Built from the same seed, every stage's
weights equal the single-process model's. The parameter names are the consolidated names
(transformer.blocks.5.attn.qkv.weight keeps its global block index; blocks of other stages are parameter-free
placeholders), so optimizer groups and state-dict keys match the one-process model's. The relative position table
is cut by columns: the published [rows, depth*H] table gives layer l the columns [l*H, (l+1)*H), so a stage holds
the columns of its own layers ([rows, len(blocks)*h], h the heads on this tensor-parallel rank) - no copy of the
whole table on every stage and no gradient reduction across stages. (pipeline_convert maps state dicts.)

Streams. One pass of a training step carries one or more sequences ("streams") through the blocks:
    image   [B, 1+P, D]  image experts              text     [B, T, D]  text experts
    image_vl, text_vl    the VL-expert path of the top blocks (ITC's second feature pair): a copy of the image /
                         text stream taken at block vlffn_start, then run with the VL expert
    fused   [B', T+1+P, D]  [text ; I_CLS ; patches] (ITM, MLM)
Passes: "unimodal" = image + text with the VL path (ITC), "image" (MIM, optional patch mask), "text" (text MLM),
"fused". Between stages the streams of a pass travel as ONE tensor [B, sum of lengths, D], cut and re-joined along
the sequence axis, because pipeline p2p sends one tensor per micro-batch. Every stream runs through each block as its
own call, in VLMo.run_blocks, so a stage computes exactly the single-process numbers.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmo_ds.model.vlmo import PASSES, STREAM_SEQUENCE, PassInputs, VLMo

FIRST_STAGE_MODULES = ("text_embeddings", "token_type_embeddings")
"""Top-level modules of VLMo that live on the first stage (with transformer.patch_embed / cls_token / pos_embed /
mask_token); the blocks go by index; everything else but the relative table is a head on the last stage."""
_BACKBONE_INPUTS = ("patch_embed", "cls_token", "pos_embed", "mask_token")
_TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


def split_blocks(depth: int, stages: int) -> list[range]:
    """Contiguous block ranges of `stages` stages, sizes differing by at most one (the larger ones first)."""
    if not 1 <= stages <= depth:
        raise ValueError(f"parallel.pipeline={stages} must be between 1 and model.depth={depth}; every stage needs "
                         "at least one block")
    base, extra = divmod(depth, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


class PipelineStage(VLMo):
    """Stage `stage` of `stages` cut from `model` (which it takes apart: do not use `model` afterwards).

    It adopts the model's modules instead of building its own (nn.Module.__init__, not VLMo.__init__): the blocks
    of other stages become parameter-free placeholders, the modules of the other end are dropped, and the relative
    table keeps the columns of this stage's blocks (VLMo.layer_table reads them by held_blocks).
    """

    def __init__(self, model: VLMo, stage: int, stages: int):
        nn.Module.__init__(self)
        cfg = model.cfg
        self.cfg = cfg
        self.held_blocks = split_blocks(cfg.depth, stages)[stage]
        self.stage, self.stages = stage, stages
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        backbone = model.transformer
        for i in range(cfg.depth):
            if i not in self.held_blocks:
                backbone.blocks[i] = nn.Identity()  # keeps the global index of every other block
        if not self.is_first:
            for name in _BACKBONE_INPUTS:
                setattr(backbone, name, None)
        if not self.is_last:
            backbone.norm = None
        self.transformer = backbone
        for name, module in model.named_children():
            keep = self.is_first if name in FIRST_STAGE_MODULES else self.is_last
            if name != "transformer" and keep:
                setattr(self, name, module)
        for name, param in model.named_parameters(recurse=False):
            if name != "relative_position_bias_table" and self.is_last:
                setattr(self, name, param)
        if cfg.rel_pos:
            table = model.relative_position_bias_table
            h = table.shape[1] // cfg.depth  # heads on this tensor-parallel rank
            blocks = self.held_blocks
            own = nn.Parameter(table.detach()[:, blocks.start * h : blocks.stop * h].clone(),
                               requires_grad=table.requires_grad)
            for attribute in _TP_ATTRIBUTES:
                if hasattr(table, attribute):
                    setattr(own, attribute, getattr(table, attribute))
            self.relative_position_bias_table = own
            for name in ("image_index", "text_index", "fused_index"):
                self.register_buffer(name, getattr(model, name), persistent=False)

    def entry_streams(self, kind: str) -> list[str]:
        """Names of the streams that arrive at this stage (in the order they are packed)."""
        if kind not in PASSES:
            raise ValueError(f"unknown pipeline pass {kind!r}; passes are {', '.join(PASSES)}")
        if kind == "unimodal":
            vl = self.held_blocks.start > self.cfg.vlffn_start  # the VL copies are taken entering block vlffn_start
            return ["image", "text"] + (["image_vl", "text_vl"] if vl else [])
        return [kind]

    def _unpack(self, kind: str, hidden: torch.Tensor | None, text_len: int) -> dict[str, torch.Tensor]:
        names = self.entry_streams(kind)
        lengths = [{"image": self.cfg.image_len, "text": text_len,
                    "fused": text_len + self.cfg.image_len}[STREAM_SEQUENCE[n]] for n in names]
        if hidden is None or hidden.shape[1] != sum(lengths):
            got = None if hidden is None else tuple(hidden.shape)
            raise ValueError(f"stage {self.stage} expected the {kind} streams {names} ({sum(lengths)} positions) "
                             f"from the previous stage, got {got}; every stage must run the same layout")
        return dict(zip(names, hidden.split(lengths, dim=1)))


def stage_pass(stage: PipelineStage, kind: str, inputs: PassInputs, hidden: torch.Tensor | None = None):
    """One micro-batch pass of `kind` through the stage's blocks (call it through the module: `stage(stage_pass,
    kind, inputs, hidden)`, the way every step enters the model).

    hidden: the previous stage's packed output [B, N, D] (None on the first stage).
    Returns the packed streams [B, N', D] for the next stage, or on the last stage {stream: [B, L, D] after the
    final norm} (image_vl / text_vl present for "unimodal").
    """
    text_len = 0 if inputs.text_mask is None else inputs.text_mask.shape[1]
    streams = stage.embed(kind, inputs) if stage.is_first else stage._unpack(kind, hidden, text_len)
    vl_path = kind == "unimodal"
    streams = stage.run_blocks(streams, inputs, stage.held_blocks, vl_path)
    if not stage.is_last:
        return torch.cat(list(streams.values()), dim=1)
    return stage.final_norm(streams, vl_path)
