"""Image files on disk as shard members: their bytes kept as they are, their extension taken from their content.

The loaders find a sample's image by extension (jpg, jpeg, png, webp; vlmo_ds.data.decode) and Pillow decodes by
content, so a member is named by what the bytes are, not by the file's name: NLVR2's ``*.png`` files are often
JPEG data and become ``left.jpg``. JPEG, PNG and WebP bytes are copied unchanged (no re-encoding loss); any other
format Pillow reads (GIF, BMP, TIFF, ...) is converted to 8-bit RGB and stored as PNG, which the caller notes.
Only the header is read to identify a file; a file whose pixel data is corrupt is caught by the loaders later.
Image paths come from annotation files, which are data, not trusted: a path that leaves the image folder
(``../x.jpg``, ``/etc/x.jpg``) is never looked at (``is_inside``; the conversion reports it as escaping_path).
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from PIL import Image

from vlmo_ds.data.decode import to_rgb

EXT_BY_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}

T = TypeVar("T")
R = TypeVar("R")


class ImageProblem(Exception):
    """An image that cannot be stored: ``kind`` is "missing_image", "bad_image" or "escaping_path" (report kinds)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class ImageFile:
    """An image ready to store: the member extension, its bytes, and whether it was converted to PNG."""

    ext: str
    data: bytes
    reencoded: bool = False


def image_format(data: bytes) -> str:
    """Pillow's name for the format of ``data`` ("JPEG", "PNG", ...); ImageProblem("bad_image") if none."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return str(image.format)
    except Exception as err:  # Pillow raises many types on junk (OSError, SyntaxError, ValueError, ...)
        raise ImageProblem("bad_image", f"{type(err).__name__}: {err}") from err


def read_image_file(path: Path) -> ImageFile:
    """The image at ``path`` as a shard member; ImageProblem when it is missing or not an image."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as err:
        raise ImageProblem("missing_image", str(path)) from err
    except OSError as err:  # a folder, no permission, an I/O error: the file exists but cannot be used
        raise ImageProblem("bad_image", f"{path}: {err}") from err
    fmt = image_format(data)
    if fmt in EXT_BY_FORMAT:
        return ImageFile(EXT_BY_FORMAT[fmt], data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            to_rgb(image).save(buffer, format="PNG")
    except Exception as err:  # as in image_format: the decoder's exception type varies
        raise ImageProblem("bad_image", f"{path}: {fmt} data does not decode: {type(err).__name__}: {err}") from err
    return ImageFile("png", buffer.getvalue(), reencoded=True)


def is_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` lies in the folder ``root``, judged on the names alone (``..`` resolved, links not
    followed: an image folder of symbolic links to a shared store stays usable)."""
    top = os.path.normpath(os.path.abspath(root))
    return os.path.commonpath([top, os.path.normpath(os.path.abspath(path))]) == top


def first_existing(candidates: Iterable[Path], root: Path) -> Path:
    """The first of ``candidates`` that is a file inside ``root``, else the first candidate (reported missing or
    escaping when written). A candidate outside ``root`` is never looked at."""
    paths = list(candidates)
    if not paths:
        raise ValueError("no candidate image paths")
    return next((p for p in paths if is_inside(root, p) and p.is_file()), paths[0])


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` with ``workers`` threads reading ahead, in order, never more than 4 x workers ahead
    (so a data set of 100k images is never held in memory at once). ``fn`` should not raise."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
