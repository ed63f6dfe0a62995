"""Analytic FLOP counts of VLMo passes (matrix multiplies only, 2 FLOPs per multiply-add).

Used by the benchmark and the trainer's MFU estimate. Backward costs twice the forward, so a training step is 3x.
"""
from __future__ import annotations

from vlmo_ds.model.config import ModelConfig


def block_flops(cfg: ModelConfig, seq: int) -> int:
    """One MoME block over one sequence of `seq` tokens: qkv, scores, weighted sum, projection, one expert FFN."""
    d = cfg.dim
    return 2 * seq * (3 * d * d + d * d + 2 * d * cfg.mlp_dim) + 2 * 2 * seq * seq * d


def unimodal_flops(cfg: ModelConfig, seq: int, vl_path: bool) -> int:
    blocks = cfg.depth + (cfg.depth - cfg.vlffn_start if vl_path else 0)
    return blocks * block_flops(cfg, seq)


def patch_embed_flops(cfg: ModelConfig) -> int:
    return 2 * cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * cfg.dim


def image_text_step_flops(cfg: ModelConfig, batch: int, mlm: bool = True, itm: bool = True,
                          mlm_ratio: float = 1.0) -> int:
    """Forward + backward of one image-text pre-training step (ITC both paths, ITM 3B fused, MLM B fused).

    mlm_ratio: the share of text positions the MLM head scores - every one (1.0), since the loss masks unlabelled
    positions with ignore_index instead of gathering the labelled ones (a gather's size would need a host sync).
    """
    text, image = cfg.max_text_len, cfg.image_len
    fused_pairs = batch * ((1 if mlm else 0) + (3 if itm else 0))
    forward = batch * (unimodal_flops(cfg, image, True) + unimodal_flops(cfg, text, True))
    forward += fused_pairs * cfg.depth * block_flops(cfg, text + image)
    if mlm:
        forward += int(batch * text * mlm_ratio) * 2 * (cfg.dim * cfg.dim + cfg.dim * cfg.vocab_size)
    patches = (batch + fused_pairs) * patch_embed_flops(cfg)  # no gradient for the pixels: backward is 1x, not 2x
    return 3 * forward + 2 * patches
