"""Write WebDataset tar shards the vlmo_ds loaders read: shard-NNNNNN.tar files and a sizes.json beside them.

Every shard is written under ``shard-NNNNNN.tar.tmp`` and renamed when complete, so a shard that exists is whole;
sizes.json is written (atomically) last, so a folder with a sizes.json is a complete split. Members carry fixed
metadata (mtime 0, uid/gid 0, no user names, mode 0644) so the bytes depend on the content only. A sample is
``KEY.EXT`` members grouped by key, the layout img2dataset writes; keys hold no dots (WebDataset splits member names
at the first dot of the base name).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from types import TracebackType

from vlmo_ds.data.shards import SIZES_FILE

DEFAULT_SHARD_SIZE = 1000
DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB: a shard also ends when it has grown past this


def shard_name(index: int) -> str:
    """'shard-000003.tar' for index 3 (the synthetic data set's names too)."""
    return f"shard-{index:06d}.tar"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644): bytes that depend on content
    only."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ShardWriter:
    """Samples into shards of at most ``shard_size`` samples (or past ``shard_bytes`` bytes) in ``folder``.

    A folder that already holds shards or a sizes.json is refused (FileExistsError): they may be another data set's,
    and overwriting some of them would leave a mix; tools/make_shards.py clears what its own earlier run wrote
    (out_folder.py). Use as a context manager: leaving it normally finishes the last shard and writes sizes.json;
    leaving on an exception removes the unfinished shard and writes no sizes.json.
    """

    def __init__(self, folder: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE,
                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        if shard_size < 1 or shard_bytes < 1:
            raise ValueError(f"shard_size={shard_size} and shard_bytes={shard_bytes} must be positive")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        held = [*self.folder.glob("shard-*.tar"), *self.folder.glob("shard-*.tar.tmp"), self.folder / SIZES_FILE]
        held = [path for path in held if path.exists()]
        if held:
            raise FileExistsError(f"{self.folder} already holds {held[0].name} ({len(held)} shard files): write each "
                                  "data set to a folder of its own, or remove them first")
        self.shard_size, self.shard_bytes = shard_size, shard_bytes
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._keys: set[str] = set()

    def _open(self) -> None:
        self._tmp = self.folder / (shard_name(len(self.sizes)) + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)  # GNU: member names of any length
        self._count = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp, final)
        self.sizes[final.name] = self._count
        self._tar = self._tmp = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extensions ("jpg", "txt", "json", "left.png", ...) to bytes."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty with no '.' or '/'")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} written twice")
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        for ext in sorted(members):
            add_member(self._tar, f"{key}.{ext}", members[ext])
        self._count += 1
        if self._count >= self.shard_size or self._tar.offset >= self.shard_bytes:
            self._finish()

    def close(self) -> dict[str, int]:
        """Finish the last shard, write sizes.json, and return it ({shard name: samples})."""
        if self._tar is not None:
            self._finish()
        write_json_atomic(self.folder / SIZES_FILE, self.sizes)
        return self.sizes

    def abort(self) -> None:
        """Drop the unfinished shard; the finished ones stay, and no sizes.json is written."""
        if self._tar is not None:
            self._tar.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._tar = self._tmp = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
