"""Caption TSV files (Conceptual Captions / SBU style) with the images already on disk, as image-text shards.

Input: a tab-separated file, one image a line, a caption column and an image column (by 0-based index, or by
name with ``header=True``); CC3M's Train_GCC-training.tsv is ``caption<TAB>url`` with no header. The image column
names a file under ``image_root`` through ``image_pattern``, a format string with the fields
    {value}     the column's text (a relative path: the default pattern "{value}")
    {basename}  its last path component, without a URL's query ("https://x/a/b.jpg?w=3" -> "b.jpg")
    {index}     the 0-based number of the data row, header excluded ("{index:08d}.jpg" for images saved by
                row number)
    {line}      the 1-based line number in the file
Lines are split on tabs only (no quoting), so captions keep their quotes.

Output, one sample per line (the pre-training layout, as img2dataset writes it):
    KEY.jpg (or .png/.webp)   the image's bytes
    KEY.txt                   the caption
    KEY.json                  {"caption", "image" (the column's text), "line"}
A line with too few columns is reported as bad_line, a blank caption as no_caption.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from vlmo_ds.data.formats.convert import Record
from vlmo_ds.data.formats.report import SplitReport

_FIELDS = ("value", "basename", "index", "line")


@dataclass(frozen=True)
class TsvLayout:
    """Which columns hold the caption and the image, and how the image column becomes a file name."""

    caption_col: str | int = 0
    image_col: str | int = 1
    header: bool = False
    image_pattern: str = "{value}"

    def check_pattern(self) -> None:
        """ValueError unless image_pattern formats with the documented fields."""
        try:
            self.image_pattern.format(value="a/b.jpg", basename="b.jpg", index=0, line=1)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"image pattern {self.image_pattern!r} does not format ({type(err).__name__}: {err});"
                             f" use the fields {{{'}, {'.join(_FIELDS)}}}, e.g. '{{index:08d}}.jpg'") from err


def _basename(value: str) -> str:
    path = urlsplit(value).path if "://" in value else value
    return path.rstrip("/").rsplit("/", 1)[-1]


def _column(spec: str | int, names: list[str] | None, path: Path) -> int:
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        return int(spec)
    if names is None:
        raise ValueError(f"column {spec!r} is a name: pass header=True (--header), or give the 0-based index")
    if spec not in names:
        raise ValueError(f"{path} has no column {spec!r}; its header names {names}")
    return names.index(spec)


Row = tuple[int, int, str, str]  # (line number, data row index, caption, image column text)


def tsv_rows(path: str | os.PathLike, layout: TsvLayout, report: SplitReport) -> Iterator[Row]:
    """The Row of every usable line; bad lines are reported and skipped. The file, the pattern and the columns
    are checked before the first row is asked for (FileNotFoundError / ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no caption TSV file {path}")
    layout.check_pattern()
    names = None
    if layout.header:
        with path.open(encoding="utf-8", errors="replace", newline="") as lines:
            names = next(lines, "").rstrip("\r\n").split("\t")
    columns = _column(layout.caption_col, names, path), _column(layout.image_col, names, path)
    return _rows(path, 2 if layout.header else 1, columns, report)


def _rows(path: Path, first: int, columns: tuple[int, int], report: SplitReport) -> Iterator[Row]:
    caption_at, image_at = columns
    with path.open(encoding="utf-8", errors="replace", newline="") as lines:
        for number, line in enumerate(lines, start=1):
            if number < first or not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) <= max(caption_at, image_at) or not fields[image_at].strip():
                report.problem("bad_line", f"{path.name}:{number} ({len(fields)} columns)")
                continue
            caption = fields[caption_at].strip()
            if not caption:
                report.problem("no_caption", f"{path.name}:{number}")
                continue
            yield number, number - first, caption, fields[image_at].strip()


def tsv_record(row: Row, image_root: Path, layout: TsvLayout) -> Record:
    """The record of one row: its image file named by the layout's pattern under ``image_root``."""
    number, index, caption, value = row
    name = layout.image_pattern.format(value=value, basename=_basename(value), index=index, line=number)
    meta = {"caption": caption, "image": value, "line": number}
    return Record(f"line {number}", meta, (("", image_root / name),), caption)
