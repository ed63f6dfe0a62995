"""Small stand-ins for tests of the vlmo_ds data path: a whitespace tokenizer, encoded images, and a shard writer.

Nothing here is used in training; it lets tests build WebDataset shards in a temporary folder in milliseconds.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from vlmo_ds.data.tokenizer import Tokenizer


class WordTokenizer(Tokenizer):
    """Each whitespace word is one token (two if longer than 6 characters, the second not a word start); the id
    is fixed by the word's CRC, so tests can compute expected ids by hand with ``word_id``."""

    vocab_size, pad_id, unk_id, cls_id, sep_id, mask_id = 1000, 0, 1, 2, 3, 4
    first_word_id = 5

    def word_id(self, piece: str) -> int:
        return self.first_word_id + zlib.crc32(piece.encode()) % (self.vocab_size - self.first_word_id)

    def _pieces(self, text: str) -> tuple[list[int], list[bool]]:
        ids, starts = [], []
        for word in text.split():
            pieces = [word] if len(word) <= 6 else [word[:6], word[6:]]
            ids += [self.word_id(p) for p in pieces]
            starts += [True] + [False] * (len(pieces) - 1)
        return ids, starts

    def decode(self, ids) -> str:
        raise NotImplementedError("ids are CRC hashes: the test tokenizer cannot decode")


def image_bytes(pixels: np.ndarray | Image.Image, fmt: str = "PNG", **save_args: Any) -> bytes:
    """Encode an array (H x W or H x W x C) or image with Pillow."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixels: a decompression bomb costing 57 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def plain_transform(image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
    """RGB image -> float tensor [3, H, W] in [0, 1]; no randomness."""
    assert image.mode == "RGB", image.mode
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def write_shards(folder: str | Path, samples: Sequence[dict[str, Any]], per_shard: int,
                 sizes: bool = True) -> list[Path]:
    """Write samples ({"__key__": ..., ext: bytes | str | dict}) as shard-NNNNNN.tar files, plus sizes.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, counts = [], {}
    for first in range(0, len(samples), per_shard):
        path = folder / f"shard-{first // per_shard:06d}.tar"
        chunk = samples[first:first + per_shard]
        with wds.TarWriter(str(path)) as writer:
            for sample in chunk:
                writer.write({k: json.dumps(v).encode() if isinstance(v, dict) else v for k, v in sample.items()})
        paths.append(path)
        counts[path.name] = len(chunk)
    if sizes:
        (folder / "sizes.json").write_text(json.dumps(counts))
    return paths
