"""Token masking for masked language modelling and blockwise patch masking for masked image modelling.

Pure functions: every random draw comes from the ``numpy.random.Generator`` the caller passes, so a data loader that
checkpoints its generator state resumes with exactly the masks the uninterrupted run would have drawn. The number of
draws depends only on tensor shapes, not on their contents.

Shapes: B = batch size, T = text length, H x W = patch grid (flattened row-major to N = H * W).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

IGNORE_INDEX = -100  # label value cross-entropy skips


def _choose_tokens(maskable: np.ndarray, target: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The ``target[b]`` maskable tokens of each row with the smallest keys: a uniform random subset per row."""
    keys = np.where(maskable, keys, 2.0)  # keys lie in [0, 1): unmaskable tokens sort last
    rank = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
    return maskable & (rank < target[:, None])


def _choose_words(maskable: np.ndarray, word_start: np.ndarray, target: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Whole words in random order, skipping any that would overshoot ``target`` (BERT's whole-word recipe).

    A maskable token opens a new word where word_start is set or where the token before it is not maskable. When no
    word fits (the only words are longer than the target) the first word in the random order is taken anyway, so no
    row with a maskable token ends up without a label.
    """
    prev_maskable = np.zeros_like(maskable)
    prev_maskable[:, 1:] = maskable[:, :-1]
    opens = maskable & (word_start | ~prev_maskable)
    word_id = np.cumsum(opens, axis=1) - 1  # [B, T], meaningful where maskable
    chosen = np.zeros_like(maskable)
    for row in np.flatnonzero(target):
        positions = np.flatnonzero(maskable[row])
        words = word_id[row, positions]
        sizes = np.bincount(words)
        picked = np.zeros(len(sizes), dtype=bool)
        total = 0
        order = np.argsort(keys[row, : len(sizes)], kind="stable")
        for word in order:
            if total >= target[row]:
                break
            if total + sizes[word] <= target[row]:
                picked[word] = True
                total += sizes[word]
        if total == 0:
            picked[order[0]] = True
        chosen[row, positions] = picked[words]
    return chosen


def mask_tokens(
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    word_start: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    rng: np.random.Generator,
    prob: float = 0.15,
    whole_word: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: returns (masked_ids [B, T] int64, labels [B, T] int64 with -100 where nothing is predicted).

    In each row, round(prob * n) of the n real (text_mask != 0), non-special tokens are chosen, at least one when
    n > 0; with ``whole_word`` whole words are chosen (all their pieces together) until the next would overshoot.
    Chosen tokens become [MASK] with probability 0.8, a random token with 0.1, and stay unchanged with 0.1. Random
    tokens are drawn uniformly from ids below ``vocab_size`` that are not special. ``mask_id`` is always treated as
    special.
    """
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask probability {prob} must lie in (0, 1]; BERT uses 0.15")
    if text_ids.dim() != 2 or text_ids.shape != text_mask.shape or text_ids.shape != word_start.shape:
        raise ValueError(
            f"text_ids {tuple(text_ids.shape)}, text_mask {tuple(text_mask.shape)} and word_start "
            f"{tuple(word_start.shape)} must all be [B, T]"
        )
    special = np.array(sorted({*special_ids, mask_id}), dtype=np.int64)
    candidates = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), special)
    if len(candidates) == 0:
        raise ValueError(f"every id below vocab_size={vocab_size} is special: no token is left for random replacement")

    ids = text_ids.detach().cpu().numpy().astype(np.int64)
    maskable = (text_mask.detach().cpu().numpy() != 0) & ~np.isin(ids, special)
    n_maskable = maskable.sum(axis=1)
    target = np.where(n_maskable > 0, np.maximum(1, np.floor(prob * n_maskable + 0.5)), 0).astype(np.int64)

    keys = rng.random(ids.shape)
    action = rng.random(ids.shape)
    replacement = candidates[rng.integers(0, len(candidates), size=ids.shape)]

    if whole_word:
        chosen = _choose_words(maskable, word_start.detach().cpu().numpy().astype(bool), target, keys)
    else:
        chosen = _choose_tokens(maskable, target, keys)
    masked = ids.copy()
    masked[chosen & (action < 0.8)] = mask_id
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    masked[to_random] = replacement[to_random]
    labels = np.where(chosen, ids, IGNORE_INDEX)
    device = text_ids.device
    return torch.from_numpy(masked).to(device), torch.from_numpy(labels).to(device)


def _add_block(
    mask: np.ndarray, budget: int, rng: np.random.Generator, min_block: int, log_aspect: tuple[float, float],
    attempts: int,
) -> int:
    """Try ``attempts`` random rectangles; mask the first that adds 1..budget new patches. Returns patches added."""
    height, width = mask.shape
    for _ in range(attempts):
        area = rng.uniform(min(min_block, budget), budget)
        aspect = math.exp(rng.uniform(*log_aspect))  # height / width
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (1 <= h <= height and 1 <= w <= width):
            continue
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        added = h * w - int(mask[top : top + h, left : left + w].sum())
        if 0 < added <= budget:
            mask[top : top + h, left : left + w] = True
            return added
    return 0


def blockwise_mask(
    height: int,
    width: int,
    num_masked: int,
    rng: np.random.Generator,
    min_block: int = 16,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    max_block: int | None = None,
    exact: bool = False,
    attempts: int = 10,
) -> torch.Tensor:
    """BEiT blockwise masking of an H x W patch grid: a bool [H * W] mask (row-major), True = masked.

    Rectangles of random area (between ``min_block`` and what is left of the target, capped by ``max_block``) and
    random aspect ratio height/width (log-uniform in [min_aspect, max_aspect], max_aspect defaulting to 1/min_aspect)
    are placed until ``num_masked`` patches are masked. A rectangle is kept only if it adds at least one patch and
    does not overshoot, so the mask never exceeds ``num_masked``. If ``attempts`` rectangles in a row are rejected,
    placement stops short (BEiT's rule); ``exact=True`` then tops up with random single patches to hit the count.
    """
    if not 0 <= num_masked <= height * width:
        raise ValueError(f"num_masked={num_masked} must lie in [0, {height * width}] for a {height}x{width} grid")
    if min_block < 1 or attempts < 1:
        raise ValueError(f"min_block={min_block} and attempts={attempts} must be at least 1")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if not 0.0 < min_aspect <= max_aspect:
        raise ValueError(f"aspect range [{min_aspect}, {max_aspect}] must be positive and ordered")
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    cap = num_masked if max_block is None else max_block

    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < num_masked:
        added = _add_block(mask, min(num_masked - count, cap), rng, min_block, log_aspect, attempts)
        if added == 0:
            break
        count += added
    if exact and count < num_masked:
        free = np.flatnonzero(~mask.reshape(-1))
        mask.reshape(-1)[rng.choice(free, size=num_masked - count, replace=False)] = True
    return torch.from_numpy(mask.reshape(-1))


def mask_patches_batch(
    batch_size: int, height: int, width: int, ratio: float, rng: np.random.Generator, **kwargs
) -> torch.Tensor:
    """``batch_size`` independent blockwise masks of round(ratio * H * W) patches each: bool [B, H * W].

    Extra keyword arguments go to ``blockwise_mask`` (min_block, min_aspect, max_aspect, max_block, exact, attempts).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio {ratio} must lie in [0, 1]; BEiT masks about 0.4 of the patches")
    num_masked = int(math.floor(ratio * height * width + 0.5))
    return torch.stack([blockwise_mask(height, width, num_masked, rng, **kwargs) for _ in range(batch_size)])
