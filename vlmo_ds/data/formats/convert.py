"""The conversion loop every format shares: records in, image files read, samples written, problems reported.

A format module (karpathy, vqa2, nlvr2, caption_tsv) parses its annotation files into ``Record``s, each naming the
image files of one sample and the JSON (and caption) to store with them; ``write_split`` reads the images (threads
reading ahead), writes ``KEY.<image ext>`` / ``KEY.<prefix>.<image ext>`` + ``KEY.json`` (+ ``KEY.txt``) samples with
keys 00000000, 00000001, ... in the written order, and reports every record it could not write. An image path
outside the image folder is reported (escaping_path) and never opened: annotation files are not trusted.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vlmo_ds.data.formats.images import ImageFile, ImageProblem, is_inside, ordered_map, read_image_file
from vlmo_ds.data.formats.report import SplitReport
from vlmo_ds.data.formats.shard_writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SIZE, ShardWriter
from vlmo_ds.data.shards import SIZES_FILE

T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    """One sample to write.

    name:   how the report names the record ("question 458752000", "dev-850-0-0", "COCO_val2014_...jpg")
    meta:   the sample's .json member
    images: (member prefix, file) pairs: ("", path) becomes KEY.jpg, ("left", path) becomes KEY.left.jpg
    text:   the .txt member (a caption), if any
    """

    name: str
    meta: dict[str, Any]
    images: tuple[tuple[str, Path], ...]
    text: str | None = None


@dataclass(frozen=True)
class WriteOptions:
    """How a split is written: shard limits, image-reading threads, a progress callback (records done)."""

    shard_size: int = DEFAULT_SHARD_SIZE
    shard_bytes: int = DEFAULT_SHARD_BYTES
    workers: int = 4
    progress: Callable[[int], None] | None = field(default=None, compare=False)


def shuffled(items: Sequence[T], seed: int | None) -> list[T]:
    """The items in a seeded random order (the same for a seed on every machine), or as given for seed None.

    The loaders mix a few open shards rather than shuffling samples, so a file sorted by image (VQA questions,
    NLVR2 sentences) is shuffled when written, not left for the loader.
    """
    items = list(items)
    if seed is not None:
        random.Random(seed).shuffle(items)
    return items


def _load(record: Record, image_root: Path) -> tuple[Record, list[tuple[str, ImageFile]] | ImageProblem, Path | None]:
    """Read a record's images in a worker thread; the first problem is returned, not raised."""
    files = []
    for prefix, path in record.images:
        try:
            if not is_inside(image_root, path):
                raise ImageProblem("escaping_path", f"{path} is outside the image folder {image_root}")
            files.append((prefix, read_image_file(path)))
        except ImageProblem as problem:
            return record, problem, path
    return record, files, None


def _members(record: Record, files: list[tuple[str, ImageFile]]) -> dict[str, bytes]:
    members = {(f"{prefix}.{image.ext}" if prefix else image.ext): image.data for prefix, image in files}
    members["json"] = json.dumps(record.meta, ensure_ascii=False).encode("utf-8")  # key order kept: answer_counts
    if record.text is not None:
        members["txt"] = record.text.encode("utf-8")
    return members


def write_split(records: Iterable[Record], folder: Path, image_root: Path, report: SplitReport,
                options: WriteOptions = WriteOptions()) -> list[Path]:
    """Write ``records`` as shards in ``folder`` and return the files written (shards, then sizes.json); records
    whose images are missing, unreadable or outside ``image_root`` are reported in ``report`` (missing_image /
    bad_image / escaping_path, named "record name: path") and left out, the rest are written."""
    progress = options.progress or (lambda n: None)
    with ShardWriter(folder, options.shard_size, options.shard_bytes) as writer:
        load = functools.partial(_load, image_root=image_root)
        for record, files, path in ordered_map(load, records, options.workers):
            progress(1)
            if isinstance(files, ImageProblem):
                report.problem(files.kind, f"{record.name}: {path}")
                continue
            for prefix, image in files:
                if image.reencoded:
                    report.note("reencoded", f"{record.name}: {prefix or 'image'} stored as PNG")
            writer.write(f"{report.written:08d}", _members(record, files))
            report.written += 1
    report.shards = len(writer.sizes)  # leaving the block finished the last shard and wrote sizes.json
    return [folder / name for name in writer.sizes] + [folder / SIZES_FILE]
