"""Batch hooks: the random masking a loader applies to each collated batch, with the stream's own Generator, so that
a resumed loader masks exactly as the uninterrupted one did (vlmo_ds.data.stream)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmo_ds.data.masking import mask_patches_batch, mask_tokens
from vlmo_ds.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class TextMasking:
    """Adds mlm_ids / mlm_labels [B, T] (BERT masking; whole words when whole_word)."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    prob: float = 0.15
    whole_word: bool = False

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, prob: float = 0.15, whole_word: bool = False) -> "TextMasking":
        return cls(tokenizer.mask_id, tokenizer.vocab_size, tuple(sorted(tokenizer.special_ids)), prob, whole_word)

    def __call__(self, batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        batch["mlm_ids"], batch["mlm_labels"] = mask_tokens(
            batch["text_ids"], batch["text_mask"], batch["word_start"], mask_id=self.mask_id,
            vocab_size=self.vocab_size, special_ids=self.special_ids, rng=rng, prob=self.prob,
            whole_word=self.whole_word)
        return batch


@dataclass(frozen=True)
class PatchMasking:
    """Adds patch_mask [B, P]: BEiT blockwise masks of round(ratio * P) patches on a window x window grid."""

    window: int
    ratio: float = 0.4
    min_block: int = 16

    def __call__(self, batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        batch["patch_mask"] = mask_patches_batch(batch["image"].shape[0], self.window, self.window, self.ratio, rng,
                                                 min_block=self.min_block, exact=True)
        return batch
