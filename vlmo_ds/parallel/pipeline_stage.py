"""One pipeline stage of VLMo: a contiguous range of MoME blocks, the embeddings on the first stage, the final norm and
every head on the last.

A stage is cut out of a built VLMo (`PipelineStage(model, stage, stages)`): built from the same seed, every stage's
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
own call with the same arguments as in VLMo, so a stage computes exactly the single-process numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmo_ds.model.vlmo import VLMo, UnimodalOutput, padding_bias

FIRST_STAGE_MODULES = ("text_embeddings", "token_type_embeddings")
"""Top-level modules of VLMo that live on the first stage (with transformer.patch_embed / cls_token / pos_embed /
mask_token); the blocks go by index; everything else but the relative table is a head on the last stage."""
_BACKBONE_INPUTS = ("patch_embed", "cls_token", "pos_embed", "mask_token")
_TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")
PASSES = ("unimodal", "image", "text", "fused")
_MODE = {"image": "image", "text": "text", "image_vl": "vl", "text_vl": "vl", "fused": "fused"}
_BIAS = {"image": "image", "image_vl": "image", "text": "text", "text_vl": "text", "fused": "fused"}


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


@dataclass
class PassInputs:
    """What one micro-batch pass needs on a stage. The first stage embeds images / text_ids; every stage needs
    text_mask (the text and fused streams' padding bias) and T = text_mask.shape[1] to cut streams apart."""

    text_mask: torch.Tensor | None = None
    """[B, T] 1/0 key mask of the text (or the text part of the fused sequence)."""
    text_ids: torch.Tensor | None = None
    """[B, T] token ids (first stage)."""
    images: torch.Tensor | None = None
    """[B, C, H, W] (first stage)."""
    patch_mask: torch.Tensor | None = None
    """[B, P] bool: patches replaced by the mask token (MIM, first stage)."""
    image_type: int = 1
    """Modality type of the image in a fused pass (2 for NLVR2's second image)."""


class PipelineStage(nn.Module):
    """Stage `stage` of `stages` cut from `model` (which it takes apart: do not use `model` afterwards)."""

    def __init__(self, model: VLMo, stage: int, stages: int):
        super().__init__()
        cfg = model.cfg
        self.cfg = cfg
        self.blocks = split_blocks(cfg.depth, stages)[stage]
        self.stage, self.stages = stage, stages
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        backbone = model.transformer
        for i in range(cfg.depth):
            if i not in self.blocks:
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
            own = nn.Parameter(table.detach()[:, self.blocks.start * h : self.blocks.stop * h].clone(),
                               requires_grad=table.requires_grad)
            for attribute in _TP_ATTRIBUTES:
                if hasattr(table, attribute):
                    setattr(own, attribute, getattr(table, attribute))
            self.relative_position_bias_table = own
            for name in ("image_index", "text_index", "fused_index"):
                self.register_buffer(name, getattr(model, name), persistent=False)

    # ---- biases ---------------------------------------------------------------------------------------------------
    def layer_biases(self, index_name: str, key_mask: torch.Tensor | None, dtype: torch.dtype) -> dict:
        """{global block index: [B|1, H, N, N] bias or None} for this stage's blocks (VLMo.layer_biases' values)."""
        pad = None if key_mask is None else padding_bias(key_mask, dtype)
        if not self.cfg.rel_pos:
            return {i: pad for i in self.blocks}
        rel = F.embedding(getattr(self, index_name), self.relative_position_bias_table).to(dtype)
        per_layer = rel.permute(2, 0, 1).unsqueeze(0).chunk(len(self.blocks), dim=1)
        return {i: r if pad is None else r + pad for i, r in zip(self.blocks, per_layer)}

    # ---- streams --------------------------------------------------------------------------------------------------
    def entry_streams(self, kind: str) -> list[str]:
        """Names of the streams that arrive at this stage (in the order they are packed)."""
        if kind not in PASSES:
            raise ValueError(f"unknown pipeline pass {kind!r}; passes are {', '.join(PASSES)}")
        if kind == "unimodal":
            vl = self.blocks.start > self.cfg.vlffn_start  # the VL copies are taken entering block vlffn_start
            return ["image", "text"] + (["image_vl", "text_vl"] if vl else [])
        return [kind]

    def _length(self, name: str, text_len: int) -> int:
        return {"image": self.cfg.image_len, "text": text_len, "fused": text_len + self.cfg.image_len}[_BIAS[name]]

    def _embed(self, kind: str, inputs: PassInputs) -> dict[str, torch.Tensor]:
        # VLMo's own functions run on this stage's modules (same attribute names): the single-process arithmetic.
        if kind == "fused":
            text = VLMo.embed_text(self, inputs.text_ids)
            return {"fused": torch.cat([text, VLMo.embed_image(self, inputs.images, inputs.image_type)], dim=1)}
        streams = {}
        if kind in ("unimodal", "image"):
            streams["image"] = VLMo.embed_image(self, inputs.images, patch_mask=inputs.patch_mask)
        if kind in ("unimodal", "text"):
            streams["text"] = VLMo.embed_text(self, inputs.text_ids)
        return streams

    def _unpack(self, kind: str, hidden: torch.Tensor, text_len: int) -> dict[str, torch.Tensor]:
        names = self.entry_streams(kind)
        lengths = [self._length(n, text_len) for n in names]
        if hidden is None or hidden.shape[1] != sum(lengths):
            got = None if hidden is None else tuple(hidden.shape)
            raise ValueError(f"stage {self.stage} expected the {kind} streams {names} ({sum(lengths)} positions) "
                             f"from the previous stage, got {got}; every stage must run the same layout")
        return dict(zip(names, hidden.split(lengths, dim=1)))

    def forward(self, kind: str, inputs: PassInputs, hidden: torch.Tensor | None = None):
        """Run this stage's blocks for one micro-batch pass.

        hidden: the previous stage's packed output [B, N, D] (None on the first stage).
        Returns the packed streams [B, N', D] for the next stage, or on the last stage {stream: [B, L, D] after the
        final norm} (image_vl / text_vl present for "unimodal").
        """
        text_len = 0 if inputs.text_mask is None else inputs.text_mask.shape[1]
        xs = self._embed(kind, inputs) if self.is_first else self._unpack(kind, hidden, text_len)
        dtype = next(iter(xs.values())).dtype
        biases = {}
        if kind in ("unimodal", "image"):
            biases["image"] = self.layer_biases("image_index", None, dtype)
        if kind in ("unimodal", "text"):
            biases["text"] = self.layer_biases("text_index", inputs.text_mask, dtype)
        if kind == "fused":
            image_keys = inputs.text_mask.new_ones(inputs.text_mask.shape[0], self.cfg.image_len)
            biases["fused"] = self.layer_biases("fused_index", torch.cat([inputs.text_mask, image_keys], 1), dtype)
        fused_text_len = text_len if kind == "fused" else 0
        for i in self.blocks:
            if kind == "unimodal" and i == self.cfg.vlffn_start:
                xs["image_vl"], xs["text_vl"] = xs["image"], xs["text"]
            block = self.transformer.blocks[i]
            for name in xs:
                xs[name] = block(xs[name], biases[_BIAS[name]][i], _MODE[name], fused_text_len)
        if not self.is_last:
            return torch.cat(list(xs.values()), dim=1)
        if kind == "unimodal" and "image_vl" not in xs:  # vlffn_start == depth: the VL path is the plain one
            xs["image_vl"], xs["text_vl"] = xs["image"], xs["text"]
        return {name: self.transformer.norm(x) for name, x in xs.items()}

    # ---- heads (last stage) ---------------------------------------------------------------------------------------
    def itc_image(self, hidden: torch.Tensor, vl_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return VLMo.itc_image(self, UnimodalOutput(hidden, vl_hidden))

    def itc_text(self, hidden: torch.Tensor, vl_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return VLMo.itc_text(self, UnimodalOutput(hidden, vl_hidden))

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return VLMo.itm_logits(self, fused)

    def mlm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        return VLMo.mlm_logits(self, text_hidden)

    def mim_logits(self, image_hidden: torch.Tensor) -> torch.Tensor:
        return VLMo.mim_logits(self, image_hidden)
