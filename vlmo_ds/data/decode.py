"""Decode the members of a WebDataset sample (img2dataset layout) and name what is wrong with bad ones.

Bad data never stops training: a decoder raises ``SampleSkipped(kind)``, the stream counts the kind, warns once per
kind naming the shard and the sample key, and moves on. Only a source with nothing usable stops training, with one
line (vlmo_ds.data.source_check).
Images in other modes (grayscale, 16-bit, CMYK, palette, with alpha) are converted to 8-bit RGB, not skipped.

Skip kinds (the keys of ``loader.skipped``):
    bad_image         image bytes Pillow cannot decode (corrupt, truncated, unknown format)
    huge_image        more pixels than the loader's ``max_pixels`` (or Pillow's decompression-bomb limit)
    no_image          a sample without a .jpg/.jpeg/.png/.webp member
    no_caption        missing, empty or whitespace-only caption (.txt); for text-only data, an empty document
    bad_json          a .json member that is not a JSON object
    no_vtok, bad_vtok visual-token ids (.vtok.npy) missing where required, or not an integer array of the right size
    truncated_tar     a shard cut short (counted once per time it is read; its remaining samples are lost)
    unreadable_shard  a shard that could not be opened
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
from PIL import Image

SKIP_KINDS = ("bad_image", "huge_image", "no_image", "no_caption", "bad_json", "no_vtok", "bad_vtok",
              "truncated_tar", "unreadable_shard")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_PIXELS = 8192 * 8192
_WHITE = (255, 255, 255, 255)


class SampleSkipped(Exception):
    """A sample that cannot be used; ``kind`` is one of SKIP_KINDS. ``where`` names the shard and the sample key
    ("/data/cc3m/shard-000012.tar sample 00012345"), set by the stream that read it, so that warnings point at the
    sample to look at."""

    def __init__(self, kind: str, detail: str = "") -> None:
        assert kind in SKIP_KINDS, kind
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.where = ""


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: 16/32-bit grayscale keeps its top 8 bits, transparency is laid on white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I" (32-bit): 16-bit PNGs and TIFFs
        grey = np.asarray(image).astype(np.int64)
        return Image.fromarray((np.clip(grey, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB Pillow image; SampleSkipped("bad_image" | "huge_image") when unusable.

    The size is read from the header before any pixel is decoded, so a huge image costs no memory. Pillow's own
    decompression-bomb check (about 179 M pixels raises) is caught and counted as huge too.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns above its MAX_IMAGE_PIXELS; the size test below decides, so the warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise SampleSkipped("huge_image", str(err)) from err
    # Pillow's decoders raise many exception types on corrupt input (OSError, ValueError, SyntaxError,
    # struct.error, IndexError, ...); any of them means these bytes are not a usable image.
    except Exception as err:
        raise SampleSkipped("bad_image", f"{type(err).__name__}: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise SampleSkipped("huge_image", f"{width}x{height} is over max_pixels={max_pixels}")
    if width == 0 or height == 0:
        raise SampleSkipped("bad_image", f"empty image {width}x{height}")
    try:
        image.load()
        return to_rgb(image)
    except Exception as err:  # corrupt or truncated pixel data: as above, the decoder's exception type varies
        raise SampleSkipped("bad_image", f"{type(err).__name__}: {err}") from err


def image_member(sample: dict[str, Any]) -> bytes:
    """The sample's image bytes (the first of .jpg, .jpeg, .png, .webp); SampleSkipped("no_image") if none."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise SampleSkipped("no_image", str(sample.get("__key__")))


def decode_text(sample: dict[str, Any], ext: str = "txt") -> str:
    """The stripped UTF-8 text of member ``ext``; SampleSkipped("no_caption") if missing or blank."""
    data = sample.get(ext)
    text = data.decode("utf-8", errors="replace").strip() if data is not None else ""
    if not text:
        raise SampleSkipped("no_caption", str(sample.get("__key__")))
    return text


def decode_json(sample: dict[str, Any]) -> dict[str, Any]:
    """The .json member as a dict ({} when absent); SampleSkipped("bad_json") if it is not a JSON object."""
    data = sample.get("json")
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise SampleSkipped("bad_json", str(err)) from err
    if not isinstance(meta, dict):
        raise SampleSkipped("bad_json", f"a JSON {type(meta).__name__}, not an object")
    return meta


def decode_vtok(sample: dict[str, Any], length: int) -> np.ndarray:
    """Visual-token ids from .vtok.npy, flattened to int64 [length]; SampleSkipped("no_vtok" | "bad_vtok")."""
    data = sample.get("vtok.npy")
    if data is None:
        raise SampleSkipped("no_vtok", str(sample.get("__key__")))
    try:
        ids = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise SampleSkipped("bad_vtok", str(err)) from err
    if not np.issubdtype(ids.dtype, np.integer) or ids.size != length:
        raise SampleSkipped("bad_vtok", f"{ids.dtype} array of {ids.size} ids, expected {length} integers")
    return ids.reshape(-1).astype(np.int64)
