"""The parameter groups a stage's `trainable` list names, and which VLMo parameters belong to each.

Membership is decided by the published key layout, one path component at a time (never by substring):

    text_embeddings    text_embeddings.*  (word, BERT segment, absolute text positions, LayerNorm)
    modality_types     token_type_embeddings.*  (text / image / second image rows)
    patch_embed        transformer.patch_embed.*, transformer.cls_token (I_CLS), transformer.pos_embed
    attention          per block: norm1, attn.*, gamma_1, gamma_2  (everything all modalities share)
    image_experts      per block: norm2_imag, mlp_imag
    text_experts       per block: norm2_text, mlp_text
    vl_experts         per block: norm2_vl, mlp_vl  (top blocks only)
    relative_position  relative_position_bias_table
    final_norm         transformer.norm
    mlm_head           mlm_score.*
    itc_heads          itc_{text,image,vl_text,vl_image}_proj.*, logit_scale, logit_vl_scale
    itm_head           itm_score.*, pooler.*  (the pooler only feeds ITM in pre-training)
    mim_head           mim_head.*, transformer.mask_token  (present only in image_mim stages)
    task_heads         vqa_classifier.*, nlvr2_classifier.*  (fine-tuning heads, vlmo_ds.tasks.heads)
    heads              mlm_head + itc_heads + itm_head + mim_head + task_heads

Every parameter of a VLMo belongs to exactly one group other than `heads`; vlmo_ds.train.freeze refuses a model
with a parameter no group claims, so a new parameter cannot silently escape freezing.
"""
from __future__ import annotations

from collections.abc import Iterable

from vlmo_ds.model.config import ModelConfig

UMBRELLAS = {"heads": ("mlm_head", "itc_heads", "itm_head", "mim_head", "task_heads")}

_BLOCK = {"norm1": "attention", "attn": "attention", "gamma_1": "attention", "gamma_2": "attention",
          "norm2_imag": "image_experts", "mlp_imag": "image_experts", "norm2_text": "text_experts",
          "mlp_text": "text_experts", "norm2_vl": "vl_experts", "mlp_vl": "vl_experts"}
_TRANSFORMER = {"patch_embed": "patch_embed", "cls_token": "patch_embed", "pos_embed": "patch_embed",
                "mask_token": "mim_head", "norm": "final_norm"}
_TOP = {"text_embeddings": "text_embeddings", "token_type_embeddings": "modality_types",
        "relative_position_bias_table": "relative_position", "mlm_score": "mlm_head", "mim_head": "mim_head",
        "itc_text_proj": "itc_heads", "itc_image_proj": "itc_heads", "itc_vl_text_proj": "itc_heads",
        "itc_vl_image_proj": "itc_heads", "logit_scale": "itc_heads", "logit_vl_scale": "itc_heads",
        "itm_score": "itm_head", "pooler": "itm_head", "vqa_classifier": "task_heads",
        "nlvr2_classifier": "task_heads"}


def group_of(name: str) -> str | None:
    """The group of a parameter name ("transformer.blocks.3.mlp_text.fc1.weight" -> "text_experts"); None if none."""
    parts = name.split(".")
    if parts[0] != "transformer":
        return _TOP.get(parts[0])
    if len(parts) > 3 and parts[1] == "blocks":
        return _BLOCK.get(parts[3])
    return _TRANSFORMER.get(parts[1]) if len(parts) > 1 else None


def expand(groups: Iterable[str]) -> frozenset[str]:
    """Group names with umbrellas (heads) replaced by their members."""
    out: set[str] = set()
    for group in groups:
        out.update(UMBRELLAS.get(group, (group,)))
    return frozenset(out)


def present_groups(cfg: ModelConfig) -> frozenset[str]:
    """The groups that hold at least one parameter in a model built from `cfg`: all, less mim_head without a MIM
    head, relative_position without the relative bias, and task_heads (attached by vlmo_ds.tasks, not built)."""
    every = set(_BLOCK.values()) | set(_TRANSFORMER.values()) | set(_TOP.values())
    absent = {"task_heads"} | ({"mim_head"} if cfg.mim_targets is None else set())
    return frozenset(every - absent - (set() if cfg.rel_pos else {"relative_position"}))
