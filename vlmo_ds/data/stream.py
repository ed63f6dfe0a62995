"""Resumable sample streams: the randomness and position of the vlmo_ds training loaders, in a few JSON numbers.

Design (why resume is exact and cheap):
- A data-parallel rank reads L logical streams (L = ``num_streams``, by default max(1, num_workers)). Stream s of rank
  r owns a numpy Generator seeded from (seed, r, s); every random choice in the stream draws from it, in a fixed
  order: which shard slot to read next, which shard to open, the image transform, the batch hook (masking).
- A stream keeps K shard slots open (``open_shards``). For each item it picks a slot at random and takes that
  slot's next item; a slot whose shard is used up reopens on a shard drawn with replacement (resampled shards, so a
  stream never runs dry). Mixing K shards stands in for a shuffle buffer, and unlike a buffer it needs no
  state beyond K (shard, byte offset, items taken) triples.
- The state of a stream is therefore: the Generator state, K slots, and skip counts. Reopening a slot seeks to the
  byte offset of the sample's first tar header (vlmo_ds.data.shard_reader) and skips nothing by decoding. A sample
  that expands into several items (a document cut into text pieces) is re-expanded on resume and ``taken`` items
  are dropped; expansion uses no randomness, so the items are the same.
- Global batch b comes from stream b % L. The loader (vlmo_ds.data.loader) records, for every batch the trainer
  consumes, the producing stream's state after that batch; its state after k batches is (k, the L stream states),
  whatever the workers had prefetched.

Shapes: a batch is whatever the pipeline's collate returns (vlmo_ds.data.pipelines).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from vlmo_ds.data.decode import SKIP_KINDS, SampleSkipped
from vlmo_ds.data.shard_reader import ShardReader, ShardTruncated
from vlmo_ds.data.source_check import SkipTally, located, no_usable_sample, source_label

logger = logging.getLogger(__name__)

BatchHook = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


class Pipeline(Protocol):
    """How a stream turns tar samples into batches (vlmo_ds.data.pipelines implements it)."""

    def expand(self, sample: dict[str, Any]) -> list[Any]:
        """Decode one sample into one or more items, deterministically; raise SampleSkipped for bad data."""

    def finish(self, item: Any, rng: np.random.Generator) -> dict[str, Any]:
        """The random part of preparing one item (image transform)."""

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Items -> one batch dict of tensors."""


def stream_seed(seed: int, dp_rank: int, stream: int) -> np.random.Generator:
    """The Generator of logical stream ``stream`` of data-parallel rank ``dp_rank``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, dp_rank, stream])))


class _Slot:
    """One open shard: its reader and the items of the sample being served."""

    def __init__(self, shard: int, url: str, offset: int, taken: int, pipeline: Pipeline) -> None:
        self.shard = shard
        self.reader = ShardReader(url, offset)
        self.items: list[Any] = []
        self.taken = 0
        self.sample_offset = offset
        if taken:  # resuming inside a multi-item sample: re-expand it (no randomness) and drop what was served
            self.next_item(pipeline)
            self.taken = taken

    @property
    def exhausted(self) -> bool:
        return self.taken == len(self.items) and self.reader.done

    def next_item(self, pipeline: Pipeline) -> Any | None:
        """The next item, None at the shard's end; raises SampleSkipped (naming the shard and key) or
        ShardTruncated."""
        while self.taken == len(self.items):
            offset = self.reader.next_offset
            sample = self.reader.next_sample()
            if sample is None:
                return None
            self.items, self.taken, self.sample_offset = [], 0, offset
            try:
                self.items = pipeline.expand(sample)
            except SampleSkipped as err:
                raise located(err, self.reader.url, sample)
        self.taken += 1
        return self.items[self.taken - 1]

    def state(self) -> dict[str, int] | None:
        if self.taken < len(self.items):
            return {"shard": self.shard, "offset": self.sample_offset, "taken": self.taken}
        if self.reader.done:
            return None
        return {"shard": self.shard, "offset": self.reader.next_offset, "taken": 0}


class SampleStream:
    """An endless, resumable stream of finished items from resampled shards, K of them open at once."""

    def __init__(self, urls: Sequence[str], pipeline: Pipeline, rng: np.random.Generator, open_shards: int,
                 max_consecutive_skips: int = 10_000, state: dict[str, Any] | None = None) -> None:
        if open_shards < 1:
            raise ValueError(f"open_shards={open_shards} must be >= 1")
        self.urls = list(urls)
        self.pipeline = pipeline
        self.rng = rng
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped: dict[str, int] = {}
        self._failing = SkipTally()  # the skips since the last good item (named by the error if too many)
        self._slots: list[_Slot | None] = [None] * open_shards
        self._saved: list[dict[str, int] | None] = [None] * open_shards  # slots to reopen lazily on first use
        if state is not None:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        if len(state["slots"]) != len(self._slots):
            raise ValueError(f"the saved stream has {len(state['slots'])} open shards, this loader "
                             f"{len(self._slots)}; resume with the same open_shards")
        self.rng.bit_generator.state = state["rng"]
        self._saved = list(state["slots"])
        self.skipped = dict(state["skipped"])

    def state_dict(self) -> dict[str, Any]:
        slots = [saved if slot is None else slot.state() for slot, saved in zip(self._slots, self._saved)]
        return {"rng": self.rng.bit_generator.state, "slots": slots, "skipped": dict(self.skipped)}

    def _count(self, kind: str, detail: str, run: SkipTally | None = None) -> None:
        """Count a skip (``run``: the current run of failures in a row, for the error if it gets too long)."""
        assert kind in SKIP_KINDS, kind
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        if run is not None:
            run.add(kind, detail)
        # the first of each kind is worth a look; the loader logs the totals at the end of every epoch
        logger.log(logging.WARNING if self.skipped[kind] == 1 else logging.DEBUG, "skipped (%s): %s", kind, detail)

    def _open(self, k: int) -> _Slot:
        """Slot k's reader: the saved position after a resume, otherwise a shard drawn with replacement."""
        saved = self._saved[k]
        self._saved[k] = None
        if saved is not None:
            shard, offset, taken = saved["shard"], saved["offset"], saved["taken"]
        else:
            shard, offset, taken = int(self.rng.integers(len(self.urls))), 0, 0
        return _Slot(shard, self.urls[shard], offset, taken, self.pipeline)

    def next_item(self) -> dict[str, Any]:
        """The next finished item; bad samples and broken shards are counted in ``skipped`` and passed over;
        DataSourceError after more than ``max_consecutive_skips`` of them in a row."""
        failures, run = 0, self._failing
        while True:
            if failures > self.max_consecutive_skips:
                raise no_usable_sample(source_label(self.urls), run, f"{failures} samples and shards in a row")
            k = int(self.rng.integers(len(self._slots)))
            slot = self._slots[k]
            try:
                if slot is None or slot.exhausted:
                    self._drop(k, None, "")
                    slot = self._slots[k] = self._open(k)
                item = slot.next_item(self.pipeline)
            except SampleSkipped as err:
                self._count(err.kind, f"{err.where}: {err}", run)
                failures += 1
                continue
            except ShardTruncated as err:
                self._drop(k, "truncated_tar", str(err), run)
                failures += 1
                continue
            except OSError as err:
                self._drop(k, "unreadable_shard", str(err), run)
                failures += 1
                continue
            if item is None:
                self._drop(k, None, "")
                failures += 1
                continue
            if run.counts:  # a good item ends the run of failures
                self._failing = SkipTally()
            return self.pipeline.finish(item, self.rng)

    def _drop(self, k: int, kind: str | None, detail: str, run: SkipTally | None = None) -> None:
        if kind is not None:
            self._count(kind, detail, run)
        slot, self._slots[k] = self._slots[k], None
        if slot is not None:
            slot.reader.close()

    def close(self) -> None:
        for k in range(len(self._slots)):
            self._drop(k, None, "")
