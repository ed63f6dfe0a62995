"""Shard lists for the streaming loaders: resolve a source to an ordered list of WebDataset tar shards.

A source is one of
- a folder: every ``*.tar`` inside it, sorted by name;
- a brace pattern, as webdataset expands it: ``"/data/cc3m/shard-{000000..000331}.tar"`` (``::`` joins several
  patterns; ``pipe:`` and ``http(s)://`` URLs pass through untouched);
- a list of paths, URLs or patterns.

Shard writers (vlmo_ds tools, img2dataset-style converters) may leave ``sizes.json`` beside the shards,
``{"shard-000000.tar": n_samples, ...}``. It is read when present, only to report how big the data set is; nothing
requires it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

logger = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
ShardSource = str | os.PathLike | Sequence[str | os.PathLike]


def _is_remote(url: str) -> bool:
    """URLs that webdataset's gopen opens through a scheme (pipe:, http:, ...); local paths have none."""
    head, sep, _ = url.partition(":")
    return bool(sep) and len(head) > 1 and "/" not in head


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ShardList:
    """An ordered list of shard URLs, with per-shard sample counts where every shard's count is known."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def num_samples(self) -> int | None:
        """Samples in all shards (from sizes.json), or None where some shard's count is unknown."""
        return None if self.sizes is None else sum(self.sizes)

    @property
    def fingerprint(self) -> str:
        """A short hash of the shard names in order; a saved loader position is only valid for the same list.

        Names, not full paths, so that a data set moved to another mount still resumes.
        """
        digest = hashlib.sha1("\n".join(_name(u) for u in self.urls).encode())
        return f"{len(self.urls)}:{digest.hexdigest()[:16]}"

    def for_rank(self, dp_rank: int, dp_size: int) -> ShardList:
        """The shards data-parallel rank ``dp_rank`` samples from: every dp_size-th shard, so ranks read disjoint
        shards. With fewer shards than ranks every rank keeps the whole list (the ranks' seeds still differ)."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if len(self.urls) < dp_size:
            logger.warning("%d shards for %d data-parallel ranks: every rank samples from all shards; "
                           "write more (smaller) shards so ranks read disjoint data", len(self.urls), dp_size)
            return self
        sizes = None if self.sizes is None else self.sizes[dp_rank::dp_size]
        return ShardList(self.urls[dp_rank::dp_size], sizes)


def _expand(source: ShardSource) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if not _is_remote(text) and Path(text).is_dir():
            urls = sorted(str(p) for p in Path(text).glob("*.tar"))
            if not urls:
                raise FileNotFoundError(f"no *.tar shards in folder {text}; point the data source at the folder "
                                        "that holds the shards, or give a brace pattern")
            return urls
        return list(expand_urls(text))
    urls: list[str] = []
    for item in source:
        urls.extend(_expand(item))
    return urls


def _read_sizes(urls: Sequence[str]) -> tuple[int, ...] | None:
    """Sample counts from the sizes.json of each shard's folder; None unless every shard is listed."""
    tables: dict[Path, dict[str, int]] = {}
    sizes = []
    for url in urls:
        if _is_remote(url):
            return None
        folder = Path(url).parent
        if folder not in tables:
            path = folder / SIZES_FILE
            try:
                tables[folder] = json.loads(path.read_text()) if path.is_file() else {}
            except (OSError, ValueError) as err:
                logger.warning("ignoring unreadable %s: %s", path, err)
                tables[folder] = {}
        count = tables[folder].get(_name(url))
        if not isinstance(count, int):
            return None
        sizes.append(count)
    return tuple(sizes)


def resolve_shards(source: ShardSource) -> ShardList:
    """Resolve a folder, brace pattern or list to a ShardList; local shards must exist."""
    urls = _expand(source)
    if not urls:
        raise FileNotFoundError(f"the shard source {source!r} names no shards")
    compressed = [u for u in urls if u.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst"))]
    if compressed:
        raise ValueError(f"compressed shard {compressed[0]}: the loader seeks inside shards to resume, so shards "
                         "must be plain .tar files (img2dataset's default); decompress them first")
    missing = [u for u in urls if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}); "
                                "check the data path or brace pattern")
    shards = ShardList(tuple(urls), _read_sizes(urls))
    if shards.num_samples is not None:
        logger.info("%d shards, %d samples (from %s)", len(shards), shards.num_samples, SIZES_FILE)
    else:
        logger.info("%d shards (no %s: data set size unknown)", len(shards), SIZES_FILE)
    return shards
