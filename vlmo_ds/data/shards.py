"""Shard lists for the streaming loaders: resolve a source to an ordered list of WebDataset tar shards.

A source is one of
- a folder: every ``*.tar`` inside it, sorted by name;
- a brace pattern, as webdataset expands it: ``"/data/cc3m/shard-{000000..000331}.tar"`` (``::`` joins several
  patterns; ``pipe:`` and ``http(s)://`` URLs pass through untouched);
- a list of paths, URLs or patterns.

Shard writers (vlmo_ds tools, img2dataset-style converters) leave ``sizes.json`` beside the shards,
``{"shard-000000.tar": n_samples, ...}``. At cluster scale it is the shard list: a rank reads it once per folder and
learns every shard's name and size from it, instead of listing the folder and stat-ing each of (tens of thousands
of) shards, times every rank, on a shared file system. Only the first shard is checked to exist (a moved data set
fails with a clear message at start-up); a shard that vanished later is counted and skipped by the stream. Without
sizes.json a folder is listed and each local shard checked, as before, and the loader says so once per folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
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


@lru_cache(maxsize=None)
def _say_unlisted(folder: str) -> None:
    """Once per folder and process: the loader fell back to listing and stat-ing shards."""
    logger.warning("no %s in %s: listing the folder and checking every shard (each rank does it; at scale write "
                   "%s with tools/make_shards.py or the shard writer)", SIZES_FILE, folder, SIZES_FILE)


def _sizes_table(folder: Path) -> dict[str, int] | None:
    """{shard name: samples} from the folder's sizes.json; None when it is absent or unusable."""
    path = folder / SIZES_FILE
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable %s: %s", path, err)
        return None
    if not isinstance(table, Mapping) or not all(isinstance(n, int) for n in table.values()):
        logger.warning("ignoring %s: it must map shard names to sample counts", path)
        return None
    return dict(table)


class _Tables:
    """sizes.json of each folder, read at most once per resolve_shards call."""

    def __init__(self) -> None:
        self._tables: dict[Path, dict[str, int] | None] = {}

    def get(self, folder: Path) -> dict[str, int] | None:
        if folder not in self._tables:
            self._tables[folder] = _sizes_table(folder)
            if self._tables[folder] is None:
                _say_unlisted(str(folder))
        return self._tables[folder]

    def size(self, url: str) -> int | None:
        """The shard's listed sample count; None for a remote URL or a shard its folder's sizes.json lacks."""
        if _is_remote(url):
            return None
        return (self.get(Path(url).parent) or {}).get(_name(url))


def _expand(source: ShardSource, tables: _Tables) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if not _is_remote(text) and Path(text).is_dir():
            listed = tables.get(Path(text))
            names = sorted(n for n in listed if n.endswith(".tar")) if listed else None
            urls = [str(Path(text) / n) for n in names] if names else sorted(str(p) for p in Path(text).glob("*.tar"))
            if not urls:
                raise FileNotFoundError(f"no *.tar shards in folder {text}; point the data source at the folder "
                                        "that holds the shards, or give a brace pattern")
            return urls
        return list(expand_urls(text))
    urls: list[str] = []
    for item in source:
        urls.extend(_expand(item, tables))
    return urls


def resolve_shards(source: ShardSource) -> ShardList:
    """Resolve a folder, brace pattern or list to a ShardList (names and sizes from sizes.json where present);
    local shards must exist (checked for the first listed shard, for each unlisted one)."""
    tables = _Tables()
    urls = _expand(source, tables)
    if not urls:
        raise FileNotFoundError(f"the shard source {source!r} names no shards")
    compressed = [u for u in urls if u.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst"))]
    if compressed:
        raise ValueError(f"compressed shard {compressed[0]}: the loader seeks inside shards to resume, so shards "
                         "must be plain .tar files (img2dataset's default); decompress them first")
    counts = [tables.size(u) for u in urls]
    local = [u for u in urls if not _is_remote(u)]
    unlisted = [u for u, n in zip(urls, counts) if n is None and not _is_remote(u)]
    checked = list(dict.fromkeys(local[:1] + unlisted))
    missing = [u for u in checked if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(checked)} checked shards do not exist (first: {missing[0]}"
                                f"); check the data path or brace pattern, and that {SIZES_FILE} is the data set's")
    sizes = None if any(n is None for n in counts) else tuple(counts)
    shards = ShardList(tuple(urls), sizes)
    if shards.num_samples is not None:
        logger.info("%d shards, %d samples (from %s)", len(shards), shards.num_samples, SIZES_FILE)
    else:
        logger.info("%d shards (no %s for every shard: data set size unknown)", len(shards), SIZES_FILE)
    return shards
