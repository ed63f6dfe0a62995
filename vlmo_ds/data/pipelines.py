"""The three kinds of VLMo pre-training data as StreamLoader pipelines, and builders for their loaders.

- image-text (img2dataset layout): ``KEY.jpg|png|webp`` + ``KEY.txt`` caption + optional ``KEY.json``;
- image-only: an image + optional ``KEY.vtok.npy`` (visual-token ids, the MIM targets);
- text-only: ``KEY.txt`` documents, tokenized whole and cut into pieces of the text length.

Batches (B = batch size, T = text length, fixed so the model can split the fused sequence at T; n = vtok_len):
    image-text: image [B, 3, H, W] float32, text_ids [B, T] int64 (pad_id after the text), text_mask [B, T] int64
                (1 = real token), word_start [B, T] bool, key list[str], meta list[dict] (the .json, {} if none)
    image-only: image [B, 3, H, W] float32, key list[str], vtok [B, n] int64 when vtok_len is set
    text-only:  text_ids, text_mask, word_start [B, T], key list[str] ("KEY#piece")
A batch hook (e.g. MLM masking) may add keys after collation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmo_ds.data.decode import (DEFAULT_MAX_PIXELS, SampleSkipped, decode_image, decode_json, decode_text,
                                 decode_vtok, image_member)
from vlmo_ds.data.loader import StreamLoader
from vlmo_ds.data.shards import ShardList, ShardSource
from vlmo_ds.data.tokenizer import Tokenizer, pad_encoded

ImageTransform = Callable[[Image.Image, np.random.Generator], torch.Tensor]


def _transform(transform: ImageTransform, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
    pixels = transform(image, rng)
    if not (isinstance(pixels, torch.Tensor) and pixels.is_floating_point() and pixels.ndim == 3
            and pixels.shape[0] == 3):
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"image_transform returned {got}; it must return a float tensor [3, H, W]")
    return pixels


def _pad_items(items: list[dict[str, Any]], text_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    return pad_encoded([(it["ids"], it["starts"]) for it in items], text_len, pad_id)


def _encode(tokenizer: Tokenizer, text: str, max_len: int) -> tuple[list[int], list[bool]]:
    ids, starts = tokenizer.encode(text, max_len)
    assert len(ids) == len(starts) <= max_len, "tokenizer.encode broke its contract"
    return list(ids), list(starts)


@dataclass
class ImageTextPipeline:
    """Image-caption pairs; the caption is tokenized to at most ``text_len`` tokens."""

    tokenizer: Tokenizer
    image_transform: ImageTransform
    text_len: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.text_len < 2:
            raise ValueError(f"text_len={self.text_len} leaves no room for [CLS] and [SEP]")

    def expand(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        ids, starts = _encode(self.tokenizer, decode_text(sample), self.text_len)
        meta = decode_json(sample)
        image = decode_image(image_member(sample), self.max_pixels)
        return [{"image": image, "ids": ids, "starts": starts, "key": sample["__key__"], "meta": meta}]

    def finish(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return {**item, "image": _transform(self.image_transform, item["image"], rng)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([it["image"] for it in items]),
                **_pad_items(items, self.text_len, self.tokenizer.pad_id),
                "key": [it["key"] for it in items], "meta": [it["meta"] for it in items]}


@dataclass
class ImagePipeline:
    """Images alone; with ``vtok_len`` every sample must carry that many visual-token ids (.vtok.npy)."""

    image_transform: ImageTransform
    vtok_len: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def expand(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        vtok = None if self.vtok_len is None else decode_vtok(sample, self.vtok_len)
        image = decode_image(image_member(sample), self.max_pixels)
        return [{"image": image, "vtok": vtok, "key": sample["__key__"]}]

    def finish(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return {**item, "image": _transform(self.image_transform, item["image"], rng)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"image": torch.stack([it["image"] for it in items]),
                                 "key": [it["key"] for it in items]}
        if self.vtok_len is not None:
            batch["vtok"] = torch.from_numpy(np.stack([it["vtok"] for it in items]))
        return batch


@dataclass
class TextPipeline:
    """Documents cut into consecutive pieces of text_len - 2 tokens, each framed as [CLS] piece [SEP]."""

    tokenizer: Tokenizer
    text_len: int

    def __post_init__(self) -> None:
        if self.text_len < 3:
            raise ValueError(f"text_len={self.text_len} leaves no room for a token between [CLS] and [SEP]")

    def expand(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        text = decode_text(sample)
        # a character is at most 4 tokens (UTF-8 byte fallback), so this bound never truncates the document
        ids, starts = _encode(self.tokenizer, text, 4 * len(text) + 2)
        body, body_starts = ids[1:-1], starts[1:-1]
        if not body:
            raise SampleSkipped("no_caption", f"{sample['__key__']}: no tokens")
        step, tok = self.text_len - 2, self.tokenizer
        return [{"ids": [tok.cls_id, *body[i:i + step], tok.sep_id],
                 "starts": [True, *body_starts[i:i + step], True], "key": f"{sample['__key__']}#{i // step}"}
                for i in range(0, len(body), step)]

    def finish(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {**_pad_items(items, self.text_len, self.tokenizer.pad_id), "key": [it["key"] for it in items]}


def image_text_loader(shards: ShardSource | ShardList, tokenizer: Tokenizer, image_transform: ImageTransform,
                      *, batch_size: int, text_len: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                      **options: Any) -> StreamLoader:
    """A StreamLoader of image-text batches; ``options`` are StreamLoader's keywords (dp_rank, dp_size,
    num_workers, seed, batches_per_epoch, batch_hook, open_shards, num_streams, ...)."""
    return StreamLoader(shards, ImageTextPipeline(tokenizer, image_transform, text_len, max_pixels), batch_size,
                        **options)


def image_loader(shards: ShardSource | ShardList, image_transform: ImageTransform, *, batch_size: int,
                 vtok_len: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, **options: Any) -> StreamLoader:
    """A StreamLoader of image-only batches (with vtok [B, vtok_len] when vtok_len is set)."""
    return StreamLoader(shards, ImagePipeline(image_transform, vtok_len, max_pixels), batch_size, **options)


def text_loader(shards: ShardSource | ShardList, tokenizer: Tokenizer, *, batch_size: int, text_len: int,
                **options: Any) -> StreamLoader:
    """A StreamLoader of text-only batches: documents cut into text_len-token pieces."""
    return StreamLoader(shards, TextPipeline(tokenizer, text_len), batch_size, **options)
