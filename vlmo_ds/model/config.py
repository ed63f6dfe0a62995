"""Model configuration and the registry of presets.

Every size vlmo_ds trains is a preset here: `tiny` runs on a laptop CPU (tests, the quick start), `base`, `base_plus`
and `large` are the published VLMo models, and the presets past `large` are for clusters (tests build them on the
meta device only). A preset is a ModelConfig; recipes override single fields (image_size=384, drop_path_rate=0.15).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NLVR2_MODALITY_TYPES = 3
"""Modality type rows of an NLVR2 model: text, first image, second image (the published code grows the table)."""


@dataclass(frozen=True)
class ModelConfig:
    """The shape and numerics of one VLMo model."""

    dim: int = 768
    """Hidden size D."""
    depth: int = 12
    """Number of MoME blocks."""
    heads: int = 12
    """Attention heads; dim must divide by it."""
    mlp_ratio: int = 4
    """Expert FFN hidden size = mlp_ratio * dim."""
    vlffn_start: int = 10
    """Blocks with index >= vlffn_start carry a vision-language expert."""
    image_size: int = 224
    """Square input resolution; the relative position table is sized for it."""
    patch_size: int = 16
    """Side of one square patch."""
    in_chans: int = 3
    """Image channels."""
    vocab_size: int = 30522
    """Text vocabulary (30522 = the published BERT uncased WordPiece)."""
    max_text_len: int = 40
    """Fixed text length T; text is padded to it so the fused sequence splits at T."""
    table_text_len: int = 196
    """Text length the relative table's text rows are sized for (the text-only stage's length)."""
    drop_path_rate: float = 0.1
    """Stochastic depth at the last block (linear from 0); the published code also uses it as text embedding dropout."""
    layer_scale_init: float | None = 0.1
    """Initial value of the layer-scale gammas; None disables layer scale (base_plus)."""
    rel_pos: bool = True
    """Relative position bias (one table, per-layer columns); False uses absolute positions (base_plus)."""
    num_modality_types: int = 2
    """Rows of the modality type table: 0 text, 1 image, 2 second image (NLVR2)."""
    ln_eps: float = 1e-6
    """LayerNorm epsilon of the blocks and the final norm (text embeddings and the MLM head use BERT's 1e-12)."""
    mim_targets: str | None = None
    """Masked image modelling head: None (none), "pixels" (normalised patch pixels) or "tokens" (visual-token ids)."""
    mim_vocab_size: int = 8192
    """Visual-token vocabulary when mim_targets="tokens" (8192 for the DALL-E tokenizer BEiT uses)."""

    def __post_init__(self) -> None:
        problems = []
        if self.dim % self.heads:
            problems.append(f"dim={self.dim} is not divisible by heads={self.heads}")
        if not 0 < self.vlffn_start <= self.depth:
            problems.append(f"vlffn_start={self.vlffn_start} must be in 1..depth={self.depth}")
        if self.image_size % self.patch_size:
            problems.append(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.max_text_len < 2:
            problems.append(f"max_text_len={self.max_text_len} must hold at least [CLS] and [SEP]")
        if self.rel_pos and self.max_text_len > self.table_text_len:
            problems.append(f"max_text_len={self.max_text_len} exceeds table_text_len={self.table_text_len}; "
                            "raise table_text_len (the relative table's text rows)")
        if self.mim_targets not in (None, "pixels", "tokens"):
            problems.append(f"mim_targets={self.mim_targets!r} must be None, 'pixels' or 'tokens'")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mlp_dim(self) -> int:
        return self.mlp_ratio * self.dim

    @property
    def window(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.window * self.window

    @property
    def image_len(self) -> int:
        """Image sequence length: I_CLS + patches."""
        return 1 + self.num_patches

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # CPU-sized: 64 px images in 8 px patches (8x8 grid), short text; the quick start trains it in minutes.
    "tiny": ModelConfig(dim=128, depth=4, heads=4, vlffn_start=3, image_size=64, patch_size=8, vocab_size=1000,
                        max_text_len=32, table_text_len=64),
    "base": ModelConfig(dim=768, depth=12, heads=12, vlffn_start=10),
    "base_plus": ModelConfig(dim=544, depth=24, heads=16, vlffn_start=21, layer_scale_init=None, rel_pos=False),
    "large": ModelConfig(dim=1024, depth=24, heads=16, vlffn_start=21),
    # Past the published sizes: ViT-g-like widths for multi-node runs (VL experts in the top 1/8 of the blocks).
    "giant": ModelConfig(dim=1408, depth=40, heads=16, vlffn_start=35),
    "huge2b": ModelConfig(dim=2048, depth=48, heads=32, vlffn_start=42),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The preset called `name`, with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown model field(s) {', '.join(sorted(unknown))}; "
                         f"fields are {', '.join(f.name for f in dataclasses.fields(ModelConfig))}")
    return PRESETS[name].replace(**overrides)
