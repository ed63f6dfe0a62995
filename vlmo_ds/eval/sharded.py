"""Evaluation work split across data-parallel ranks: each rank a contiguous slice, results gathered in rank order.

The evaluations of vlmo_ds (retrieval, VQA, NLVR2, re-ranking, embedding export) all follow one pattern:
    1. every rank indexes the same evaluation set (cheap: no pixel decoded);
    2. rank r takes items [n*r/W, n*(r+1)/W) and runs the model over them in batches;
    3. every rank makes the same number of model calls, padding with a dummy batch whose output is dropped:
       ZeRO-3 gathers parameters collectively, so a rank that stopped calling would hang the others;
    4. the per-item results are all-gathered in rank order, so every rank holds the whole set's results, exactly
       what one process would have computed (items never depend on their batch-mates).
Samples are read back from their shards by byte offset (``iter_samples``), never resampled or shuffled.
Shapes: n items, W ranks, [n_r, ...] a rank's rows.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from vlmo_ds.data.shard_reader import ShardReader


class Located(Protocol):
    """Where one sample of a set lives: its shard URL, the byte offset of its first tar header, its key."""

    url: str
    offset: int
    key: str


def rank_slice(count: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``count`` items that ``rank`` handles (sizes differ by at most one)."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


def slice_sizes(count: int, world_size: int) -> list[int]:
    return [len(rank_slice(count, r, world_size)) for r in range(world_size)]


def steps_needed(count: int, world_size: int, batch_size: int) -> int:
    """Model calls every rank makes for ``count`` items: enough for the largest slice."""
    return math.ceil(math.ceil(count / world_size) / batch_size)


def gather_rows(local: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's [n_r, ...] rows in rank order (padded to the largest n_r for all_gather); the
    identity on one process."""
    if len(sizes) == 1:
        return local
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def balanced_calls(model: nn.Module, fn: Callable[..., torch.Tensor], batches: Iterator[tuple], num_calls: int,
                   dummy: tuple, bar: tqdm | None = None) -> list[torch.Tensor]:
    """``model(fn, *batch)`` on exactly ``num_calls`` batches, the rank's own first, then ``dummy`` (output
    dropped) once they run out; returns the outputs of the real batches in order."""
    outputs = []
    for _ in range(num_calls):
        batch = next(batches, None)
        out = model(fn, *(dummy if batch is None else batch))
        if batch is not None:
            outputs.append(out)
            if bar is not None:
                bar.update(out.shape[0])
    if next(batches, None) is not None:
        raise RuntimeError("balanced_calls was given more batches than num_calls; count the steps with "
                           "steps_needed")
    return outputs


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (images are cast to it)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """eval mode and no_grad inside; the model's train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def iter_samples(entries: Sequence[Located]) -> Iterator[dict[str, Any]]:
    """The raw samples of ``entries`` in order, seeking to each by its offset (None for one not found again)."""
    reader: ShardReader | None = None
    try:
        for entry in entries:
            if reader is None or reader.url != entry.url or reader.next_offset > entry.offset:
                if reader is not None:
                    reader.close()
                reader = ShardReader(entry.url, entry.offset)
            sample = reader.next_sample()
            while sample is not None and sample["__key__"] != entry.key:  # samples the index skipped
                sample = reader.next_sample()
            yield sample
    finally:
        if reader is not None:
            reader.close()


def progress(total: int, desc: str, rank: int) -> tqdm:
    """A progress bar on rank 0 only, when stderr is a terminal (in a log file a bar is one line joined by carriage
    returns)."""
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=rank != 0 or not sys.stderr.isatty(),
                leave=False, mininterval=0.5)
