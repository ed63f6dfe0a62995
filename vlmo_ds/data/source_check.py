"""A data source whose samples are all bad stops training with one line, on every data-parallel rank alike.

Ranks read disjoint shards (ShardList.for_rank), so a rank's own stream learns that its shards are bad at a moment
the other ranks do not share; a rank that stopped alone would leave the others waiting in their next collective.
So before a loader's first batch, ``check_source`` reads the whole source (the shards of every rank) in its listed
order, the same on every rank, until it meets one usable sample; after ``limit`` bad samples and shards, or at the
end of the source, it raises DataSourceError naming the source, the skip kinds with an example of each (shard and
sample key) and the fix. Every rank decides from the same bytes, so every rank stops at the same point: its first
batch of that source (a MixedLoader checks all of its sources at its first batch). On a healthy data set it costs
one sample read and decoded per source.

A source that is good where the check reads but bad across all of one rank's shards is caught later by that rank's
stream (``max_consecutive_skips`` in a row, the same one-line error); the other ranks then learn it from the launcher
(srun --kill-on-bad-exit in slurm/launch.sh, torchrun) ending the job when that rank exits, or from the collective
timeout.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vlmo_ds.data.decode import SampleSkipped
from vlmo_ds.data.errors import DataSourceError
from vlmo_ds.data.shard_reader import ShardReader, ShardTruncated


class SkipTally:
    """Skipped samples and shards by kind, with the first one of each kind described (shard, key, reason)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, kind: str, detail: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.examples.setdefault(kind, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """'bad_image x 9 (first: /d/shard-000000.tar sample 0: bad_image: ...), no_caption x 1 (...)'."""
        return ", ".join(f"{kind} x {n} (first: {self.examples[kind]})" for kind, n in sorted(self.counts.items())) \
            or "no samples at all"


def source_label(urls: Sequence[str]) -> str:
    """The folder the shards are in ("/data/cc3m"), or the first of several ("/data/a and 2 more folders")."""
    folders = sorted({os.path.dirname(url) or "." for url in urls})
    return folders[0] if len(folders) == 1 else f"{folders[0]} and {len(folders) - 1} more folders"


def no_usable_sample(source: str, tally: SkipTally, read: str) -> DataSourceError:
    """The one-line error for a source that gave nothing but bad samples and shards."""
    return DataSourceError(f"data source {source}: {read} held no usable sample: {tally.describe()}; fix or rewrite "
                           "those shards (tools/make_shards.py reports bad inputs), or take the source out of the "
                           "recipe")


def located(err: SampleSkipped, url: str, sample: dict[str, Any]) -> SampleSkipped:
    """``err`` with its ``where`` set to the shard and the sample key."""
    err.where = f"{url} sample {sample.get('__key__')}"
    return err


def check_source(urls: Sequence[str], pipeline: Any, limit: int, source: str | None = None) -> None:
    """Return at the first usable sample of ``urls`` read in order; DataSourceError when ``limit`` + 1 samples and
    shards in a row, or all of them, are bad. ``pipeline.expand`` decides what is usable (vlmo_ds.data.stream)."""
    tally = SkipTally()
    source = source or source_label(urls)
    for url in urls:
        try:
            reader = ShardReader(url)
        except (ShardTruncated, OSError) as err:
            tally.add("truncated_tar" if isinstance(err, ShardTruncated) else "unreadable_shard", f"{url}: {err}")
        else:
            try:
                while tally.total <= limit and (sample := reader.next_sample()) is not None:
                    try:
                        if pipeline.expand(sample):
                            return
                    except SampleSkipped as err:
                        tally.add(err.kind, f"{located(err, url, sample).where}: {err}")
            except (ShardTruncated, OSError) as err:
                tally.add("truncated_tar" if isinstance(err, ShardTruncated) else "unreadable_shard", f"{url}: {err}")
            finally:
                reader.close()
        if tally.total > limit:
            raise no_usable_sample(source, tally, f"the first {tally.total} samples and shards read in order")
    raise no_usable_sample(source, tally, f"every one of its {len(urls)} shards")
