"""Masked language modelling accuracy on held-out text, beside the unigram baseline.

The held-out shards (KEY.txt documents, e.g. the synthetic text_heldout split) are read in a fixed order, cut into
pieces of the stage's text length as the training loader cuts them, and masked once with a fixed seed (the stage's
mlm_prob and whole-word setting), so every evaluation of a run sees the same masked positions. Each data-parallel
rank scores a contiguous slice; all ranks run the same number of batches (ZeRO-3 gathers parameters collectively).

    accuracy   share of masked positions whose argmax prediction is the original token
    unigram    the accuracy of always predicting the most frequent original token among those positions: what a
               model that ignores the context can reach at best
Shapes: B batch, T text length, N pieces.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vlmo_ds.data.decode import SampleSkipped
from vlmo_ds.data.hooks import TextMasking
from vlmo_ds.data.pipelines import TextPipeline
from vlmo_ds.data.shard_reader import ShardReader
from vlmo_ds.data.shards import ShardSource, resolve_shards
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.objectives.mlm import masked_lm_loss

log = logging.getLogger(__name__)
MASK_SEED = 0x5EED


def held_out_batches(shards: ShardSource, tokenizer: Tokenizer, text_len: int, batch_size: int, prob: float,
                     whole_word: bool) -> list[dict[str, torch.Tensor]]:
    """Every piece of every document, in order, as masked batches (mlm_ids, mlm_labels, text_mask [B, T])."""
    pipeline = TextPipeline(tokenizer, text_len)
    pieces: list[dict[str, Any]] = []
    for url in resolve_shards(shards).urls:
        reader = ShardReader(url)
        try:
            while (sample := reader.next_sample()) is not None:
                try:
                    pieces += pipeline.expand(sample)
                except SampleSkipped as err:
                    log.warning("held-out text: skipped %s sample %s (%s)", url, sample.get("__key__"), err)
        finally:
            reader.close()
    if not pieces:
        raise ValueError(f"no text in the held-out shards {shards!r}; eval.text_mlm needs KEY.txt documents")
    masking = TextMasking.for_tokenizer(tokenizer, prob, whole_word)
    rng = np.random.Generator(np.random.PCG64(MASK_SEED))
    return [masking(pipeline.collate(pieces[i:i + batch_size]), rng) for i in range(0, len(pieces), batch_size)]


def _scores(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[correct, masked] of one batch (masked_lm_loss takes the argmax across tensor-parallel vocabulary slices)."""
    hidden = model.encode_text(ids, mask).hidden
    _, accuracy = masked_lm_loss(hidden, labels, model.mlm_logits)
    masked = (labels != -100).sum()
    return torch.stack([(accuracy.double() * masked).round(), masked.double()])


def evaluate_text_mlm(model, batches: list[dict[str, torch.Tensor]], vocab_size: int, *, rank: int = 0,
                      world_size: int = 1, device: torch.device | str = "cpu") -> dict[str, float]:
    """{"accuracy", "unigram", "masked"} over `batches` (the same list on every rank; each scores its slice).

    `model` is a VLMo or a wrapper whose forward(fn, *args) calls fn(model, *args) (a DeepSpeed engine).
    """
    mine = batches[len(batches) * rank // world_size: len(batches) * (rank + 1) // world_size]
    steps = math.ceil(len(batches) / world_size)
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    counts = torch.zeros(vocab_size, device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(steps):
                batch = mine[i] if i < len(mine) else batches[0]  # a dummy keeps the ranks' calls equal
                labels = batch["mlm_labels"].to(device)
                scores = model(_scores, batch["mlm_ids"].to(device), batch["text_mask"].to(device), labels)
                if i < len(mine):
                    totals += scores
                    counts += torch.bincount(labels[labels != -100], minlength=vocab_size).double()
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(totals)
        dist.all_reduce(counts)
    correct, masked = totals.tolist()
    return {"accuracy": correct / masked, "unigram": counts.max().item() / masked, "masked": masked}
