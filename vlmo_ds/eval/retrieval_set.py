"""The index of an image-text retrieval set, and reading its samples back as model inputs.

A retrieval set is a folder (or brace pattern, or list) of tar shards in img2dataset's layout, one image per sample:
``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``, where the JSON may hold ``{"captions": [...], "image_id": ...}`` (COCO and
Flickr30K shards written by vlmo_ds tools, the synthetic retrieval_test split). Without JSON captions the ``.txt`` is
the one caption. Samples are read in a fixed order (shards as ``resolve_shards`` lists them, a folder sorted by name;
samples in file order), never shuffled or resampled. The index holds captions and byte offsets; images are decoded
when a rank reads its slice (``RetrievalInputs``).

Shapes: I images, T captions, S image size, L text length.
"""
from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlmo_ds.data.decode import SampleSkipped, decode_image, decode_json, image_member
from vlmo_ds.data.shard_reader import index_samples
from vlmo_ds.data.shards import ShardSource, resolve_shards
from vlmo_ds.data.task_batches import sample_captions
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.data.transforms import ImageTransform, build_image_transform
from vlmo_ds.eval.sharded import iter_samples

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalImage:
    """Where one image of the set lives: its shard, the byte offset of its sample, its key and image id."""

    url: str
    offset: int
    key: str
    image_id: Any


@dataclass
class RetrievalSet:
    """The index of a retrieval set: images in order, captions in order, and each caption's image."""

    images: list[RetrievalImage]
    captions: list[str]
    text_to_image: torch.Tensor  # [T] int64, index into images
    skipped: Counter = field(default_factory=Counter)  # samples left out, by vlmo_ds.data.decode skip kind


def _check_image_header(data: bytes) -> None:
    """Reject bytes Pillow cannot identify as an image, without decoding pixels (that happens per rank, later)."""
    try:
        Image.open(io.BytesIO(data))
    except Exception as err:  # Pillow raises many types on junk; any of them means "not an image"
        raise SampleSkipped("bad_image", f"{type(err).__name__}: {err}") from err


def load_retrieval_set(shards: ShardSource) -> RetrievalSet:
    """Index a retrieval set: one pass over the shards reading captions and sample offsets; no pixel is decoded.

    Samples with no image, an unidentifiable image, no caption or a bad JSON member are skipped and counted; a
    truncated shard keeps the samples before the cut. Every rank computes the same index.
    """
    images: list[RetrievalImage] = []
    captions: list[str] = []
    owners: list[int] = []
    skipped: Counter = Counter()
    for url, offset, sample in index_samples(resolve_shards(shards).urls, skipped, "retrieval set"):
        try:
            meta = decode_json(sample)
            texts = sample_captions(sample, meta)
            _check_image_header(image_member(sample))
        except SampleSkipped as err:
            skipped[err.kind] += 1
            continue
        owners += [len(images)] * len(texts)
        captions += texts
        key = str(sample["__key__"])
        images.append(RetrievalImage(url, offset, key, meta.get("image_id", key)))
    if skipped:
        logger.warning("retrieval set: skipped %s", dict(skipped))
    if not images:
        raise ValueError(f"no usable image-caption sample in the retrieval shards {shards!r} (skipped: "
                         f"{dict(skipped)}); check that they hold KEY.jpg with KEY.txt or KEY.json captions")
    return RetrievalSet(images, captions, torch.tensor(owners, dtype=torch.long), skipped)


def iter_images(entries: Sequence[RetrievalImage], transform: ImageTransform) -> Iterator[torch.Tensor]:
    """Decode and transform the given images in order, seeking to each shard's first wanted sample: [3, S, S] each."""
    for entry, sample in zip(entries, iter_samples(entries)):
        try:
            if sample is None:
                raise SampleSkipped("no_image", "sample not found again")
            yield transform(decode_image(image_member(sample)))
        except SampleSkipped as err:
            raise ValueError(f"retrieval image {entry.key} in {entry.url} cannot be used ({err}); every rank "
                             "must encode the same set: remove or re-encode the sample and rerun") from err


@dataclass
class RetrievalInputs:
    """How one rank turns the set's images and captions into model inputs (shared with re-ranking and export)."""

    data: RetrievalSet
    tokenizer: Tokenizer
    image_size: int
    text_len: int
    device: torch.device
    dtype: torch.dtype

    def images(self, entries: Sequence[RetrievalImage]) -> Iterator[torch.Tensor]:
        """[3, S, S] per entry, in the model's dtype on its device."""
        transform = build_image_transform(self.image_size, train=False)
        for pixels in iter_images(entries, transform):
            yield pixels.to(device=self.device, dtype=self.dtype)

    def texts(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """text_ids, text_mask [len(captions), L]."""
        encoded = self.tokenizer.batch_encode(list(captions), self.text_len)
        return encoded["text_ids"].to(self.device), encoded["text_mask"].to(self.device)

    def dummy_image(self) -> torch.Tensor:
        return torch.zeros(1, 3, self.image_size, self.image_size, device=self.device, dtype=self.dtype)
