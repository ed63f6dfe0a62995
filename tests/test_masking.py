"""MLM token masking (rates, whole words, specials, determinism) and BEiT blockwise patch masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmo_ds.data.masking import IGNORE_INDEX, blockwise_mask, mask_patches_batch, mask_tokens

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = {PAD, UNK, CLS, SEP, MASK, 7, 8}  # 7 and 8 sit inside the ordinary id range on purpose
VOCAB = 500


def _batch(batch: int, length: int, seed: int, piece_prob: float = 0.0) -> dict[str, torch.Tensor]:
    """Random rows of [CLS] words [SEP] [PAD]...; a token continues the previous word with ``piece_prob``."""
    g = np.random.default_rng(seed)
    ids = np.full((batch, length), PAD, dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    starts = np.zeros((batch, length), dtype=bool)
    for row in range(batch):
        n = int(g.integers(0, length - 1))
        ids[row, 0], ids[row, 1 : n + 1], ids[row, n + 1] = CLS, g.integers(9, VOCAB, size=n), SEP
        mask[row, : n + 2] = 1
        starts[row, : n + 2] = True
        if n > 1:
            starts[row, 2 : n + 1] = g.random(n - 1) >= piece_prob
    return {"text_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask), "word_start": torch.from_numpy(starts)}


def _mask(batch: dict[str, torch.Tensor], seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_tokens(
        batch["text_ids"], batch["text_mask"], batch["word_start"], mask_id=MASK, vocab_size=VOCAB,
        special_ids=SPECIALS, rng=np.random.default_rng(seed), **kwargs,
    )  # fmt: skip


def _expected_count(n: int) -> int:
    return 0 if n == 0 else max(1, int(np.floor(0.15 * n + 0.5)))


def test_token_masking_counts_and_rates() -> None:
    batch = _batch(4000, 40, seed=0)
    masked, labels = _mask(batch, seed=1)
    ids = batch["text_ids"]
    chosen = labels != IGNORE_INDEX
    n_real = (batch["text_mask"].sum(1) - 2).tolist()  # minus [CLS] and [SEP]
    assert chosen.sum(1).tolist() == [_expected_count(n) for n in n_real]
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing outside the chosen set changes
    total = chosen.sum().item()
    as_mask = (masked[chosen] == MASK).sum().item() / total
    kept = (masked[chosen] == ids[chosen]).sum().item() / total
    assert abs(as_mask - 0.8) < 0.015 and abs(kept - 0.1) < 0.012 and abs(1 - as_mask - kept - 0.1) < 0.012
    replaced = masked[chosen & (masked != MASK) & (masked != ids)]
    assert not torch.isin(replaced, torch.tensor(sorted(SPECIALS))).any() and replaced.max() < VOCAB
    assert len(torch.unique(replaced)) > 300  # drawn across the vocabulary, not from a few ids


def test_specials_and_padding_never_chosen() -> None:
    ids = torch.tensor([[CLS, 7, 20, UNK, 21, SEP, PAD, PAD], [CLS, SEP, PAD, PAD, PAD, PAD, PAD, PAD]])
    text_mask = (ids != PAD).long()
    starts = torch.ones_like(ids, dtype=torch.bool)
    for seed in range(50):
        masked, labels = mask_tokens(ids, text_mask, starts, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS,
                                     rng=np.random.default_rng(seed), prob=1.0)
        assert labels.tolist() == [[-100, -100, 20, -100, 21, -100, -100, -100], [-100] * 8]
        assert masked[1].tolist() == ids[1].tolist()


def test_at_least_one_token_per_row() -> None:
    ids = torch.tensor([[CLS, 30, SEP, PAD], [CLS, 30, 31, SEP]])
    starts = torch.tensor([[True, True, True, False], [True, True, False, True]])  # row 1: one word of two pieces
    for seed in range(20):
        _, labels = mask_tokens(ids, (ids != PAD).long(), starts, mask_id=MASK, vocab_size=VOCAB,
                                special_ids=SPECIALS, rng=np.random.default_rng(seed))
        assert labels[0].tolist() == [-100, 30, -100, -100]
        assert (labels[1] != -100).sum().item() == 1
        _, labels = mask_tokens(ids, (ids != PAD).long(), starts, mask_id=MASK, vocab_size=VOCAB,
                                special_ids=SPECIALS, rng=np.random.default_rng(seed), whole_word=True)
        assert labels[1].tolist() == [-100, 30, 31, -100]  # the only word overshoots the target, taken whole


def test_whole_word_masking_keeps_words_together() -> None:
    batch = _batch(3000, 40, seed=2, piece_prob=0.4)
    masked, labels = _mask(batch, seed=3, whole_word=True)
    chosen = (labels != IGNORE_INDEX).numpy()
    starts = batch["word_start"].numpy()
    real = (batch["text_mask"].numpy() != 0) & (batch["text_ids"].numpy() > 8)
    for row in range(len(chosen)):
        positions = np.flatnonzero(real[row])
        words = np.cumsum(starts[row, positions])
        for word in np.unique(words):
            flags = chosen[row, positions[words == word]]
            assert flags.all() or not flags.any()
        n = len(positions)
        assert chosen[row].sum() <= _expected_count(n) or len(np.unique(words[chosen[row, positions]])) == 1
        assert (chosen[row].sum() > 0) == (n > 0)
    rate = chosen.sum() / real.sum()
    assert 0.12 < rate < 0.16


def test_masking_is_deterministic_given_seed() -> None:
    batch = _batch(64, 24, seed=4, piece_prob=0.3)
    for whole_word in (False, True):
        first = _mask(batch, seed=5, whole_word=whole_word)
        again = _mask(batch, seed=5, whole_word=whole_word)
        other = _mask(batch, seed=6, whole_word=whole_word)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not torch.equal(first[1], other[1])
        assert first[0].dtype == torch.int64 and first[1].dtype == torch.int64


def test_mask_tokens_rejects_bad_input() -> None:
    batch = _batch(2, 8, seed=0)
    with pytest.raises(ValueError, match="probability"):
        _mask(batch, seed=0, prob=0.0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        mask_tokens(batch["text_ids"], batch["text_mask"][:, :4], batch["word_start"], mask_id=MASK,
                    vocab_size=VOCAB, special_ids=SPECIALS, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="special"):
        mask_tokens(batch["text_ids"], batch["text_mask"], batch["word_start"], mask_id=MASK, vocab_size=5,
                    special_ids=SPECIALS, rng=np.random.default_rng(0))


def _bounding_box(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def test_blockwise_count_never_exceeds_target() -> None:
    rng = np.random.default_rng(0)
    counts = [blockwise_mask(14, 14, 78, rng).sum().item() for _ in range(300)]
    assert max(counts) == 78 and min(counts) >= 70
    assert all(blockwise_mask(14, 14, 78, rng, exact=True).sum().item() == 78 for _ in range(100))
    assert blockwise_mask(14, 14, 196, rng, exact=True).all()
    assert not blockwise_mask(14, 14, 0, rng).any()


def test_blocks_are_rectangles_of_the_asked_shape() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        square = blockwise_mask(14, 14, 16, rng, min_block=16, min_aspect=1.0).numpy().reshape(14, 14)
        assert square.sum() == 16 and _bounding_box(square) == (4, 4)
        tall = blockwise_mask(10, 12, 16, rng, min_block=16, min_aspect=4.0, max_aspect=4.0).numpy().reshape(10, 12)
        assert tall.sum() == 16 and _bounding_box(tall) == (8, 2)  # aspect is height / width


def test_max_block_caps_each_block() -> None:
    rng = np.random.default_rng(2)
    mask = blockwise_mask(8, 8, 4, rng, min_block=4, min_aspect=1.0, max_block=4).numpy().reshape(8, 8)
    assert mask.sum() == 4 and _bounding_box(mask) == (2, 2)
    many = blockwise_mask(8, 8, 40, rng, min_block=4, min_aspect=1.0, max_block=4).numpy().reshape(8, 8)
    assert many.sum() <= 40


def test_blockwise_deterministic_and_validated() -> None:
    a = mask_patches_batch(8, 14, 14, 0.4, np.random.default_rng(3))
    b = mask_patches_batch(8, 14, 14, 0.4, np.random.default_rng(3))
    assert a.shape == (8, 196) and a.dtype == torch.bool and torch.equal(a, b)
    assert (a.sum(1) <= 78).all() and len({tuple(row.tolist()) for row in a}) == 8
    exact = mask_patches_batch(4, 4, 4, 0.4, np.random.default_rng(3), exact=True)
    assert exact.sum(1).tolist() == [6, 6, 6, 6]  # round(0.4 * 16) = 6
    with pytest.raises(ValueError, match="num_masked"):
        blockwise_mask(4, 4, 17, np.random.default_rng(0))
    with pytest.raises(ValueError, match="aspect"):
        blockwise_mask(4, 4, 4, np.random.default_rng(0), min_aspect=2.0, max_aspect=1.0)
    with pytest.raises(ValueError, match="ratio"):
        mask_patches_batch(2, 4, 4, 1.5, np.random.default_rng(0))
