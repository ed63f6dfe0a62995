"""StreamLoader: batches from resampled WebDataset shards through torch DataLoader workers, resumable exactly.

The loader's position is part of a vlmo_ds checkpoint: ``state_dict()`` after the trainer consumed k batches,
``load_state_dict()`` in a fresh loader, and the next batches are the ones the uninterrupted run would have seen.
How (see vlmo_ds.data.stream for the stream side):
- Global batch b comes from logical stream b % L. An iteration that starts after k consumed batches gives worker w
  of W the batches j = w, w + W, ... (DataLoader's round-robin order), i.e. streams (k + j) % L. W must divide L,
  so each stream lives in one worker.
- Every batch carries (b, its stream, that stream's state after the batch). The loader records it when the batch
  is handed to the trainer, not when a worker made it, so prefetched batches never leak into the state.
- Each ``iter()`` starts workers afresh from the recorded state; epoch ends and resumes take the same path.
Data-parallel rank and size are passed in (never read from the environment). The tensor- and pipeline-parallel ranks
of one replica share one loader: its reading rank runs it and broadcasts the batches (vlmo_ds.data.replica).
A source whose samples are all bad raises DataSourceError (one line) at the first batch, on every rank alike
(vlmo_ds.data.source_check); a worker's DataSourceError reaches the trainer as that line, not as a worker traceback.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmo_ds.data.errors import DataSourceError
from vlmo_ds.data.shards import ShardList, ShardSource, resolve_shards
from vlmo_ds.data.source_check import check_source, source_label
from vlmo_ds.data.stream import BatchHook, Pipeline, SampleStream, stream_seed

logger = logging.getLogger(__name__)

STATE_FORMAT = "vlmo_ds.stream_loader/1"
_POSITION = "_stream_position"  # batch key the workers add and the loader removes
_FAILED = "_data_source_error"  # the one "batch" a worker sends when its stream gave up: the error's line


class _StreamBatches(IterableDataset):
    """Worker side: batches start + j for this worker's j, each from stream (start + j) % num_streams."""

    def __init__(self, loader: StreamLoader, start: int, count: int | None) -> None:
        super().__init__()
        self.urls = loader.shards.urls
        self.pipeline = loader.pipeline
        self.batch_size = loader.batch_size
        self.batch_hook = loader.batch_hook
        self.seed, self.dp_rank = loader.seed, loader.dp_rank
        self.num_streams, self.open_shards = loader.num_streams, loader.open_shards
        self.max_consecutive_skips = loader.max_consecutive_skips
        self.states = copy.deepcopy(loader._streams)
        self.start, self.count = start, count

    def _stream(self, s: int) -> SampleStream:
        return SampleStream(self.urls, self.pipeline, stream_seed(self.seed, self.dp_rank, s), self.open_shards,
                            self.max_consecutive_skips, self.states[s])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        offsets = itertools.count(worker, workers) if self.count is None else range(worker, self.count, workers)
        streams: dict[int, SampleStream] = {}
        try:  # a DataSourceError travels as a marker: DataLoader would wrap it in a multi-line worker traceback
            for j in offsets:
                b = self.start + j
                s = b % self.num_streams
                if s not in streams:
                    streams[s] = self._stream(s)
                stream = streams[s]
                batch = self.pipeline.collate([stream.next_item() for _ in range(self.batch_size)])
                if self.batch_hook is not None:
                    batch = self.batch_hook(batch, stream.rng)
                batch[_POSITION] = {"batch": b, "stream": s, "state": stream.state_dict()}
                yield batch
        except DataSourceError as err:
            yield {_FAILED: str(err)}
        finally:
            for stream in streams.values():
                stream.close()


class StreamLoader:
    """Fixed-size batches from resampled shards for one data-parallel rank; iterate it once per epoch.

    shards: a folder, brace pattern or list (vlmo_ds.data.shards), or a resolved ShardList of all ranks' shards.
    pipeline: what turns samples into batches (vlmo_ds.data.pipelines).
    batches_per_epoch: batches one ``iter()`` yields (the rest of the epoch after a mid-epoch resume); None = endless.
    batch_hook: ``hook(batch, rng) -> batch`` after collation (masking), drawing from the stream's Generator.
    open_shards: shards each stream reads from at once (K), the mixing that replaces a shuffle buffer.
    num_streams: logical streams L per rank (default max(1, num_workers)); num_workers must divide it. A state saved
        with L streams resumes exactly under any num_workers dividing L.
    """

    def __init__(self, shards: ShardSource | ShardList, pipeline: Pipeline, batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1, num_workers: int = 0, seed: int = 0, batches_per_epoch: int | None = None,
                 batch_hook: BatchHook | None = None, open_shards: int = 4, num_streams: int | None = None,
                 max_consecutive_skips: int = 10_000, pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch={batches_per_epoch} must be >= 1 (or None for an endless loader)")
        if num_workers < 0 or open_shards < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 0 and open_shards={open_shards} >= 1")
        self.num_streams = max(1, num_workers) if num_streams is None else num_streams
        if self.num_streams < 1 or self.num_streams % max(1, num_workers):
            raise ValueError(f"num_streams={self.num_streams} must be a positive multiple of num_workers="
                             f"{num_workers}: each logical stream must live in one worker")
        all_shards = shards if isinstance(shards, ShardList) else resolve_shards(shards)
        named = isinstance(shards, (str, os.PathLike))  # a folder or pattern as the recipe gives it
        self.source = os.fspath(shards) if named else source_label(all_shards.urls)
        self._all_urls: tuple[str, ...] | None = all_shards.urls  # None once check_source found a usable sample
        self.shards = all_shards.for_rank(dp_rank, dp_size)
        self.pipeline, self.batch_size, self.batch_hook = pipeline, batch_size, batch_hook
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers, self.open_shards = num_workers, open_shards
        self.batches_per_epoch = batches_per_epoch
        self.max_consecutive_skips = max_consecutive_skips
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._batches = 0  # batches consumed by the trainer
        self._streams: list[dict[str, Any] | None] = [None] * self.num_streams  # None = not started

    @property
    def num_samples(self) -> int | None:
        """Samples in this rank's shards, from sizes.json; None when unknown."""
        return self.shards.num_samples

    @property
    def batches(self) -> int:
        """Batches handed to the trainer so far, over all epochs."""
        return self._batches

    @property
    def epoch(self) -> int | None:
        return None if self.batches_per_epoch is None else self._batches // self.batches_per_epoch

    @property
    def skipped(self) -> dict[str, int]:
        """Samples and shards skipped so far, by kind (vlmo_ds.data.decode), summed over streams and workers."""
        total: dict[str, int] = {}
        for state in self._streams:
            for kind, n in (state or {}).get("skipped", {}).items():
                total[kind] = total.get(kind, 0) + n
        return dict(sorted(total.items()))

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an endless StreamLoader (batches_per_epoch=None) has no length")
        return self.batches_per_epoch

    def check_source(self) -> None:
        """Once per loader: DataSourceError unless the source (every rank's shards, read in order) holds a usable
        sample; the same answer on every rank (vlmo_ds.data.source_check). The first iteration calls it."""
        if self._all_urls is not None:
            check_source(self._all_urls, self.pipeline, self.max_consecutive_skips, self.source)
            self._all_urls = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.check_source()
        count = None
        if self.batches_per_epoch is not None:
            count = self.batches_per_epoch - self._batches % self.batches_per_epoch
        dataset = _StreamBatches(self, self._batches, count)
        # Our own generator: starting workers draws a seed from it, and must not advance the trainer's global RNG
        # (drop path, dropout), or a resumed run would draw different masks than the uninterrupted one.
        workers = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                             prefetch_factor=self.prefetch_factor if self.num_workers else None,
                             generator=torch.Generator())
        for batch in workers:
            if _FAILED in batch:
                raise DataSourceError(batch[_FAILED])
            position = batch.pop(_POSITION)
            assert position["batch"] == self._batches, "DataLoader broke its round-robin order"
            self._streams[position["stream"]] = position["state"]
            self._batches += 1
            yield batch
        if self.skipped:
            logger.info("data-parallel rank %d, after %d batches: skipped %s", self.dp_rank, self._batches,
                        self.skipped)

    def _identity(self) -> dict[str, Any]:
        """What a saved position depends on; a state only resumes exactly into a loader with the same values."""
        return {"pipeline": type(self.pipeline).__name__, "shards": self.shards.fingerprint, "seed": self.seed,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "batch_size": self.batch_size,
                "num_streams": self.num_streams, "open_shards": self.open_shards}

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able position after the batches consumed so far."""
        return {"format": STATE_FORMAT, **self._identity(), "batches": self._batches,
                "streams": copy.deepcopy(self._streams)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict``); call it before iterating."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a StreamLoader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        for name, value in self._identity().items():
            if state.get(name) != value:
                hint = (" (num_streams defaults to max(1, num_workers): pass num_streams="
                        f"{state.get(name)} and a num_workers dividing it)") if name == "num_streams" else ""
                raise ValueError(f"the saved data position has {name}={state.get(name)!r} but this loader "
                                 f"{value!r}{hint}; resume with the same data settings, or start without "
                                 "loading the data state (the run then sees a fresh sample order)")
        self._batches = int(state["batches"])
        self._streams = copy.deepcopy(list(state["streams"]))
