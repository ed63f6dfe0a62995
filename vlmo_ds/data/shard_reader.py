"""Read one WebDataset tar shard sample by sample, from any sample boundary, knowing each sample's byte offset.

Members are grouped into samples the way webdataset does (consecutive members sharing the name before the first dot
of the base name, webdataset's ``base_plus_ext``: ``000042.jpg`` + ``000042.txt`` + ``000042.json`` -> key
``000042``). Unlike webdataset's own iterator, the reader keeps the byte offset of the next sample's first header,
so a resumed loader reopens the shard there: a seek on a local file, a read-and-discard on a pipe, and never a
decode of the samples it skips.

A tar cut short (a failed copy, a full disk) ends the shard early with ``ShardTruncated``: the samples before the cut
are served, the rest are lost. A cut exactly at a member boundary is caught by checking for the end-of-archive block.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import IO, Any

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

logger = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
_META = re.compile(r"(^|/)__[^/]*__$")  # webdataset's reserved metadata members, never part of a sample
_SKIP_CHUNK = 1 << 20


class ShardTruncated(Exception):
    """The shard ended inside a member or without its end-of-archive block: the rest of the shard is lost.

    ``offset`` is the byte offset of the broken header (reopening there fails the same way); ``key`` is the key of
    the member whose data was cut, None where the cut fell in a header.
    """

    def __init__(self, message: str, offset: int, key: str | None = None) -> None:
        super().__init__(message)
        self.offset = offset
        self.key = key


class ShardReader:
    """Samples of one shard, starting at byte ``offset`` (0 or an offset earlier returned by ``next_offset``).

    ``next_sample()`` returns ``{"__key__": key, "__url__": url, ext: bytes, ...}`` or None at the shard's end.
    """

    def __init__(self, url: str, offset: int = 0) -> None:
        self.url = url
        self._raw: IO[bytes] = gopen(url, "rb")
        self._base = offset
        try:
            self._skip_to(offset)
            # tarfile reads the first header here; an archive cut exactly at ``offset`` fails now
            self._tar = tarfile.open(fileobj=self._raw, mode="r|")
        except (tarfile.TarError, EOFError) as err:
            self.close()
            raise ShardTruncated(f"{url}: no tar header at byte {offset}: {err}", offset) from err
        except ShardTruncated:
            self.close()
            raise
        self._pending: tuple[int, str, str, bytes] | None = None  # lookahead member: (offset, key, ext, data)
        self._error: ShardTruncated | None = None  # a cut met while looking ahead, raised on the next call
        self._done = False
        self.next_offset = offset

    def _seekable(self) -> bool:
        seekable = getattr(self._raw, "seekable", None)
        return bool(seekable and seekable())

    def _skip_to(self, offset: int) -> None:
        if offset == 0:
            return
        if self._seekable():
            self._raw.seek(offset)
            return
        left = offset
        while left > 0:
            chunk = self._raw.read(min(left, _SKIP_CHUNK))
            if not chunk:
                raise ShardTruncated(f"{self.url} ends before byte {offset}", offset)
            left -= len(chunk)

    def _check_end(self) -> None:
        """Raise ShardTruncated unless the archive ends with a zero block (tarfile treats a bare EOF as the end)."""
        if not self._seekable():
            return
        end = self._base + self._tar.offset
        self._raw.seek(end)
        if self._raw.read(BLOCK) != bytes(BLOCK):
            raise ShardTruncated(f"{self.url} has no end-of-archive block at byte {end}", end)

    def _next_member(self) -> tuple[int, str, str, bytes] | None:
        """The next regular member as (absolute offset, key, extension, data), or None at the end."""
        while True:
            try:
                info = self._tar.next()
            except (tarfile.TarError, EOFError) as err:
                raise ShardTruncated(f"{self.url}: {err}", self._base + self._tar.offset) from err
            if info is None:
                self._check_end()
                return None
            self._tar.members = []  # tarfile keeps every header it has seen; a shard can hold 100k members
            if not info.isreg() or _META.search(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            try:
                data = self._tar.extractfile(info).read()
            except (tarfile.TarError, EOFError) as err:
                raise ShardTruncated(f"{self.url}: {info.name}: {err}", self._base + info.offset, key) from err
            return self._base + info.offset, key, ext.lower(), data

    @property
    def done(self) -> bool:
        """True once the end of the archive was read: no sample is left."""
        return self._done

    def _lookahead(self, key: str | None) -> None:
        """Read the next member into ``_pending``. A cut there is deferred (the samples before it are whole) unless
        it lies in the data of a member of sample ``key``, or no sample is being assembled."""
        try:
            self._pending = self._next_member()
        except ShardTruncated as err:
            self._pending = None
            if key is None or err.key == key:
                raise
            self._error = err
            self.next_offset = err.offset
            return
        if self._pending is None:
            self._done = True
            self.next_offset = self._base + self._tar.offset
        else:
            self.next_offset = self._pending[0]

    def next_sample(self) -> dict[str, bytes | str] | None:
        """The next sample, None at the end; raises ShardTruncated where the shard was cut."""
        if self._error is not None:
            raise self._error
        if self._done:
            return None
        if self._pending is None:
            self._lookahead(None)
            if self._pending is None:
                return None
        _, key, ext, data = self._pending
        sample: dict[str, bytes | str] = {"__key__": key, "__url__": self.url, ext: data}
        while True:
            self._lookahead(key)
            if self._pending is None or self._pending[1] != key:
                return sample
            sample[self._pending[2]] = self._pending[3]

    def close(self) -> None:
        try:
            self._raw.close()
        except OSError as err:  # a pipe: command killed by the early close may report a failure; nothing is lost
            logger.debug("closing %s: %s", self.url, err)


def index_samples(urls: Iterable[str], skipped: Counter, label: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(url, byte offset, sample) of every sample of the shards in order, for building an evaluation index. A
    truncated shard keeps the samples before the cut; each cut counts once in skipped["truncated_tar"] and is logged
    under `label`."""
    for url in urls:
        try:
            reader = ShardReader(url)
        except ShardTruncated as err:
            logger.warning("%s: %s", label, err)
            skipped["truncated_tar"] += 1
            continue
        try:
            while True:
                offset = reader.next_offset
                sample = reader.next_sample()
                if sample is None:
                    break
                yield url, offset, sample
        except ShardTruncated as err:
            logger.warning("%s: %s; the samples before the cut are used", label, err)
            skipped["truncated_tar"] += 1
        finally:
            reader.close()
