"""VLMo: one MoME transformer used as an image encoder, a text encoder (the dual encoder for retrieval and ITC) and a
fusion encoder over [text ; I_CLS ; patches] (ITM, MLM, VQA, NLVR2).

Shapes: B batch, T text length (fixed, padded), P patches, D dim, V vocabulary, H heads, N sequence.
Module and parameter names are those of the published checkpoint, so its state dict maps onto ours key for key.

One forward: a pass (`embed` -> `run_blocks` over a range of blocks -> `final_norm`) is the code of the one-process
paths (encode_image / encode_text / encode_pair) and of every pipeline stage, which is a VLMo holding only its
blocks (vlmo_ds.parallel.pipeline_stage); the losses over the final streams are in vlmo_ds.objectives.pretrain.

What a block keeps for backward (the capacity planner models this):
    with activation checkpointing: its input [B, N, D]; shared by every block of a pass: the relative index
        [N', N'] (int64) and the key mask [B, N'] (bool), N' = N padded for the kernel (vlmo_ds.model.attention)
    without: the pre-norm block's tensors - the two norm inputs, qkv [B, N, 3D], the attention output [B, N, D] and
        log-sum-exp [B, H, N], the projection input, the expert's fc1 and GELU outputs [B, N, 4D], drop-path masks -
        and, on the sdpa kernel, its additive mask: [1, H, N', N'] for images, [B, H, N', N'] for padded text and
        fused sequences (FlexAttention keeps no mask)
No per-layer bias exists outside a block: each block builds it from the index, the key mask and its table columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlmo_ds.model import relative_position as rp
from vlmo_ds.model.attention import AttentionInputs, kernel_for
from vlmo_ds.model.backbone import Backbone
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.embeddings import TextEmbeddings
from vlmo_ds.model.heads import MLMHead, Pooler, Projection
from vlmo_ds.model.layers import Layers


@dataclass
class UnimodalOutput:
    hidden: torch.Tensor
    """[B, N, D] after the final norm, through the modality's own experts."""
    vl_hidden: torch.Tensor | None
    """[B, N, D] after the final norm, top blocks re-run with the VL expert (the second ITC path); None if not asked."""


@dataclass
class PassInputs:
    """What one pass reads: the embeddings need images / text_ids; every block range needs text_mask (the text and
    fused streams' key padding; T = text_mask.shape[1])."""

    text_mask: torch.Tensor | None = None
    """[B, T] 1/0 key mask of the text (or the text part of the fused sequence)."""
    text_ids: torch.Tensor | None = None
    """[B, T] token ids."""
    images: torch.Tensor | None = None
    """[B, C, H, W]."""
    patch_mask: torch.Tensor | None = None
    """[B, P] bool: patches replaced by the mask token (MIM)."""
    image_type: int = 1
    """Modality type of the image in a fused pass (2 for NLVR2's second image)."""


PASSES = ("unimodal", "image", "text", "fused")
"""Pass kinds: image and text together with the VL path (ITC), image alone (MIM), text alone (MLM), fused."""
STREAM_MODE = {"image": "image", "text": "text", "image_vl": "vl", "text_vl": "vl", "fused": "fused"}
"""The block mode of each stream a pass carries; image_vl / text_vl are the VL-expert copies of the image / text
stream taken entering block vlffn_start (ITC's second feature pair)."""
STREAM_SEQUENCE = {"image": "image", "image_vl": "image", "text": "text", "text_vl": "text", "fused": "fused"}
"""The sequence (relative positions, key padding) each stream attends over."""


class VLMo(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: Layers | None = None):
        super().__init__()
        layers = layers or Layers()
        self.cfg = cfg
        d = cfg.dim
        self.transformer = Backbone(cfg, layers)
        self.held_blocks = range(cfg.depth)
        """The blocks whose modules and relative-table columns this model holds (a pipeline stage: its range)."""
        if cfg.rel_pos:
            local_heads = layers.local(cfg.heads, "heads")
            rows = rp.num_rows(cfg.window, cfg.table_text_len)
            # [rows, depth * local heads]: layer l's columns are [l*h, (l+1)*h) for this rank's h heads.
            self.relative_position_bias_table = layers.shard_parameter(
                nn.Parameter(torch.zeros(rows, cfg.depth * local_heads)), dim=1)
            # Derived from the config, never saved: the published files' copies are ignored on import.
            self.register_buffer("image_index", rp.image_index(cfg.window), persistent=False)
            self.register_buffer("text_index", rp.text_index(cfg.max_text_len, cfg.window, cfg.table_text_len),
                                 persistent=False)
            self.register_buffer("fused_index", rp.fused_index(cfg.max_text_len, cfg.window, cfg.table_text_len),
                                 persistent=False)
        self.text_embeddings = TextEmbeddings(cfg, layers)
        self.token_type_embeddings = nn.Embedding(cfg.num_modality_types, d)
        self.pooler = Pooler(d, layers)
        self.itm_score = Projection(d, 2, bias=True, layers=layers)
        self.itc_text_proj = Projection(d, d, bias=False, layers=layers)
        self.itc_image_proj = Projection(d, d, bias=False, layers=layers)
        self.itc_vl_text_proj = Projection(d, d, bias=False, layers=layers)
        self.itc_vl_image_proj = Projection(d, d, bias=False, layers=layers)
        # Shape [1], not the published [] (export restores it): DeepSpeed broadcasts parameters viewed as bytes,
        # which a 0-dim tensor cannot be.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.logit_vl_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.mlm_score = MLMHead(d, cfg.vocab_size, layers)
        if cfg.mim_targets:
            out = cfg.mim_vocab_size if cfg.mim_targets == "tokens" else cfg.patch_size**2 * cfg.in_chans
            self.mim_head = layers.replicated(d, out)
        for module in (self.token_type_embeddings, self.pooler, self.itm_score, self.itc_text_proj,
                       self.itc_image_proj, self.itc_vl_text_proj, self.itc_vl_image_proj, self.mlm_score,
                       getattr(self, "mim_head", None)):
            if module is not None:
                _init_normal(module)

    def forward(self, objective: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `objective(self, *args, **kwargs)`: a training step enters the model here, once.

        The objectives call several paths (image, text, fused) per step; entering through forward lets DeepSpeed's
        ZeRO-3 hooks see the top-level parameters (relative table, logit scales) for the whole step.
        """
        return objective(self, *args, **kwargs)

    # ---- one pass over a range of blocks: the one-process paths and every pipeline stage run this code -------------
    def embed(self, kind: str, inputs: PassInputs) -> dict[str, torch.Tensor]:
        """The streams entering block 0 of pass `kind` (PASSES), {stream: [B, L, D]}."""
        if kind not in PASSES:
            raise ValueError(f"unknown pass {kind!r}; passes are {', '.join(PASSES)}")
        if kind == "fused":
            text = self.embed_text(inputs.text_ids)
            return {"fused": torch.cat([text, self.embed_image(inputs.images, inputs.image_type)], dim=1)}
        streams = {}
        if kind in ("unimodal", "image"):
            streams["image"] = self.embed_image(inputs.images, patch_mask=inputs.patch_mask)
        if kind in ("unimodal", "text"):
            streams["text"] = self.embed_text(inputs.text_ids)
        return streams

    def attention_inputs(self, sequence: str, inputs: PassInputs, device: torch.device) -> AttentionInputs:
        """Index and key mask of "image", "text" or "fused" sequences, shared by every block of a pass."""
        text_len = 0 if inputs.text_mask is None else inputs.text_mask.shape[1]
        length, key_mask = {"image": (self.cfg.image_len, None), "text": (text_len, inputs.text_mask),
                            "fused": (text_len + self.cfg.image_len, inputs.text_mask)}[sequence]
        if sequence == "fused":
            key_mask = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], self.cfg.image_len)], dim=1)
        index = getattr(self, f"{sequence}_index") if self.cfg.rel_pos else None
        return AttentionInputs(length, index, key_mask, kernel_for(device.type), device)

    def layer_table(self, i: int) -> torch.Tensor | None:
        """Block i's [rows, H] columns of the relative table (a view; None without relative positions)."""
        if not self.cfg.rel_pos:
            return None
        table = self.relative_position_bias_table
        h = table.shape[1] // len(self.held_blocks)
        j = i - self.held_blocks.start
        return table[:, j * h : (j + 1) * h]

    def run_blocks(self, streams: dict[str, torch.Tensor], inputs: PassInputs, blocks: range,
                   vl_path: bool = False) -> dict[str, torch.Tensor]:
        """Every stream through blocks `blocks` (each stream its own call per block, in its STREAM_MODE); with
        vl_path, the image / text streams are copied entering block vlffn_start into image_vl / text_vl."""
        device = next(iter(streams.values())).device
        attention = {seq: self.attention_inputs(seq, inputs, device) for seq in {STREAM_SEQUENCE[n] for n in streams}}
        text_len = inputs.text_mask.shape[1] if "fused" in streams else 0
        streams = dict(streams)
        for i in blocks:
            if vl_path and i == self.cfg.vlffn_start:
                streams |= {f"{name}_vl": streams[name] for name in ("image", "text") if name in streams}
            block, table = self.transformer.blocks[i], self.layer_table(i)
            for name, x in streams.items():
                streams[name] = block(x, STREAM_MODE[name], attention[STREAM_SEQUENCE[name]], table, text_len)
        return streams

    def final_norm(self, streams: dict[str, torch.Tensor], vl_path: bool = False) -> dict[str, torch.Tensor]:
        """The final norm of every stream; with vl_path and no VL block (vlffn_start = depth) the VL path is the
        plain one."""
        if vl_path:
            streams = {f"{name}_vl": streams[name] for name in ("image", "text") if name in streams} | streams
        return {name: self.transformer.norm(x) for name, x in streams.items()}

    def encode(self, kind: str, inputs: PassInputs, vl_path: bool = False) -> dict[str, torch.Tensor]:
        """Pass `kind` through every block: {stream: [B, L, D] after the final norm}."""
        return self.final_norm(self.run_blocks(self.embed(kind, inputs), inputs, range(self.cfg.depth), vl_path),
                               vl_path)

    # ---- embeddings ---------------------------------------------------------------------------------------------
    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, D] with the text modality type."""
        return self.text_embeddings(text_ids) + self.token_type_embeddings(torch.zeros_like(text_ids))

    def embed_image(self, images: torch.Tensor, image_type: int = 1,
                    patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1+P, D] with modality type `image_type` (2 for the second NLVR2 image)."""
        x = self.transformer(images, patch_mask)
        return x + self.token_type_embeddings(torch.full(x.shape[:2], image_type, device=x.device))

    # ---- the three paths ------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, vl_path: bool = False,
                     patch_mask: torch.Tensor | None = None) -> UnimodalOutput:
        """Image only, through the image experts: hidden [B, 1+P, D] (I_CLS first)."""
        out = self.encode("image", PassInputs(images=images, patch_mask=patch_mask), vl_path)
        return UnimodalOutput(out["image"], out.get("image_vl"))

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor, vl_path: bool = False) -> UnimodalOutput:
        """Text only, through the text experts: hidden [B, T, D] (T_CLS first)."""
        out = self.encode("text", PassInputs(text_mask=text_mask, text_ids=text_ids), vl_path)
        return UnimodalOutput(out["text"], out.get("text_vl"))

    def encode_pair(self, text_ids: torch.Tensor, text_mask: torch.Tensor, images: torch.Tensor,
                    image_type: int = 1) -> torch.Tensor:
        """Fusion encoder over [text ; I_CLS ; patches]: [B, T+1+P, D] after the final norm."""
        inputs = PassInputs(text_mask=text_mask, text_ids=text_ids, images=images, image_type=image_type)
        return self.encode("fused", inputs)["fused"]

    # ---- heads ------------------------------------------------------------------------------------------------------
    def itc_image(self, out: UnimodalOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """L2-normalised ITC image features [B, D] of both paths (the VL one None when not computed)."""
        return _itc(self.itc_image_proj, out.hidden), _itc(self.itc_vl_image_proj, out.vl_hidden)

    def itc_text(self, out: UnimodalOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _itc(self.itc_text_proj, out.hidden), _itc(self.itc_vl_text_proj, out.vl_hidden)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """[B, T+1+P, D] -> [B, 2] (not matched, matched)."""
        return self.itm_score(self.pooler(fused))

    def mlm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T, V]."""
        return self.mlm_score(text_hidden)

    def mim_logits(self, image_hidden: torch.Tensor) -> torch.Tensor:
        """[B, 1+P, D] -> [B, P, targets] (pixels of a patch, or visual-token logits)."""
        return self.mim_head(image_hidden[:, 1:])


def _itc(proj: nn.Module, hidden: torch.Tensor | None) -> torch.Tensor | None:
    return None if hidden is None else F.normalize(proj(hidden[:, 0]), dim=-1)


def _init_normal(module: nn.Module) -> None:
    """The published heads' initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
