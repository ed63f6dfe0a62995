"""Zero-shot / fine-tuned image-text retrieval evaluation of a VLMo dual encoder over WebDataset shards.

A retrieval set is a folder (or brace pattern, or list) of tar shards in img2dataset's layout, one image per sample:
``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``, where the JSON may hold ``{"captions": [...], "image_id": ...}`` (COCO and
Flickr30K shards written by vlmo_ds tools, the synthetic retrieval_test split). Without JSON captions the ``.txt`` is
the one caption. Samples are read in a fixed order (shards as ``resolve_shards`` lists them, a folder sorted by name;
samples in file order), never shuffled or resampled.

``evaluate_retrieval`` indexes the shards (captions and byte offsets, no image decoded), then each data-parallel rank
encodes a contiguous slice of the images and of the captions, the features are all-gathered, and every rank scores
the full similarity matrix with ``vlmo_ds.eval.metrics.recall_at_k``, so all ranks return the same metrics.

Shapes: I images, T captions, D feature size, S image size, L text length.
"""
from __future__ import annotations

import io
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from tqdm import tqdm

from vlmo_ds.data.decode import SampleSkipped, decode_image, decode_json, decode_text, image_member
from vlmo_ds.data.shard_reader import ShardReader, ShardTruncated
from vlmo_ds.data.shards import ShardSource, resolve_shards
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.data.transforms import ImageTransform, build_image_transform
from vlmo_ds.eval.metrics import DEFAULT_KS, recall_at_k

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


def _captions(sample: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """JSON "captions" (non-blank strings) if there are any, else the .txt caption; SampleSkipped if neither."""
    listed = meta.get("captions")
    if isinstance(listed, list):
        captions = [c.strip() for c in listed if isinstance(c, str) and c.strip()]
        if captions:
            return captions
    return [decode_text(sample)]


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
    for url in resolve_shards(shards).urls:
        try:
            reader = ShardReader(url)
        except ShardTruncated as err:
            logger.warning("retrieval set: %s", err)
            skipped["truncated_tar"] += 1
            continue
        try:
            while True:
                offset = reader.next_offset
                sample = reader.next_sample()
                if sample is None:
                    break
                try:
                    meta = decode_json(sample)
                    texts = _captions(sample, meta)
                    _check_image_header(image_member(sample))
                except SampleSkipped as err:
                    skipped[err.kind] += 1
                    continue
                owners += [len(images)] * len(texts)
                captions += texts
                key = str(sample["__key__"])
                images.append(RetrievalImage(url, offset, key, meta.get("image_id", key)))
        except ShardTruncated as err:
            logger.warning("retrieval set: %s; the samples before the cut are used", err)
            skipped["truncated_tar"] += 1
        finally:
            reader.close()
    if skipped:
        logger.warning("retrieval set: skipped %s", dict(skipped))
    if not images:
        raise ValueError(f"no usable image-caption sample in the retrieval shards {shards!r} (skipped: "
                         f"{dict(skipped)}); check that they hold KEY.jpg with KEY.txt or KEY.json captions")
    return RetrievalSet(images, captions, torch.tensor(owners, dtype=torch.long), skipped)


def iter_images(entries: Sequence[RetrievalImage], transform: ImageTransform) -> Iterator[torch.Tensor]:
    """Decode and transform the given images in order, seeking to each shard's first wanted sample: [3, S, S] each."""
    reader: ShardReader | None = None
    try:
        for entry in entries:
            if reader is None or reader.url != entry.url or reader.next_offset > entry.offset:
                if reader is not None:
                    reader.close()
                reader = ShardReader(entry.url, entry.offset)
            sample = reader.next_sample()
            while sample is not None and sample["__key__"] != entry.key:  # samples skipped by the index
                sample = reader.next_sample()
            try:
                if sample is None:
                    raise SampleSkipped("no_image", "sample not found again")
                yield transform(decode_image(image_member(sample)))
            except SampleSkipped as err:
                raise ValueError(f"retrieval image {entry.key} in {entry.url} cannot be used ({err}); every rank "
                                 "must encode the same set: remove or re-encode the sample and rerun") from err
    finally:
        if reader is not None:
            reader.close()


def _slice(count: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``count`` items that ``rank`` encodes (sizes differ by at most one)."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


def _image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.itc_image(model.encode_image(images))[0]


def _text_features(model: nn.Module, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    return model.itc_text(model.encode_text(text_ids, text_mask))[0]


def _gather_rows(local: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's [n_r, D] rows in rank order (padded to the largest n_r for all_gather)."""
    padded = local.new_zeros(max(sizes), local.shape[1])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _encode(model: nn.Module, batches: Iterator[tuple], num_batches: int, dummy: tuple,
            fn: Callable[..., torch.Tensor], bar: tqdm) -> torch.Tensor:
    """Run ``model(fn, *batch)`` on exactly ``num_batches`` batches, padding with ``dummy`` (outputs dropped) once
    the rank's own batches run out: ZeRO-3 gathers parameters collectively, so all ranks must call the model equally
    often. Returns [n, D] float32 features of the real batches."""
    features = []
    for _ in range(num_batches):
        batch = next(batches, None)
        out = model(fn, *(dummy if batch is None else batch))
        if batch is not None:
            features.append(out.float())
            bar.update(out.shape[0])
    return torch.cat(features) if features else torch.zeros(0, out.shape[1], device=out.device)


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_retrieval(model: nn.Module, shards: ShardSource, tokenizer: Tokenizer, image_size: int, text_len: int,
                       batch_size: int = 64, rank: int = 0, world_size: int = 1,
                       group: dist.ProcessGroup | None = None, device: str | torch.device = "cpu",
                       ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Image-text retrieval of ``model``'s ITC features over ``shards``.

    ``model`` is a VLMo (or a wrapper whose forward(fn, *args) calls fn(model, *args), such as a DeepSpeed engine);
    it runs in eval mode under no_grad, and its train/eval mode is restored afterwards. ``rank``/``world_size``/
    ``group`` are the DATA-parallel rank, size and group: tensor-parallel peers encode the same slice. Returns
    recall_at_k's metrics (tr@K, ir@K, r_mean, chance_*) plus num_images, num_texts, skipped_samples and seconds
    (wall time of the whole evaluation), the same on every rank.
    """
    if world_size > 1 and not dist.is_initialized():
        raise ValueError(f"world_size={world_size} needs torch.distributed initialised (or pass world_size=1)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    start = time.perf_counter()
    device = torch.device(device)
    data = load_retrieval_set(shards)
    num_images, num_texts = len(data.images), len(data.captions)
    image_part, text_part = _slice(num_images, rank, world_size), _slice(num_texts, rank, world_size)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    transform = build_image_transform(image_size, train=False)

    def image_batches() -> Iterator[tuple[torch.Tensor]]:
        for batch in _batched(iter_images(data.images[image_part.start:image_part.stop], transform), batch_size):
            yield (torch.stack(batch).to(device=device, dtype=dtype),)  # [B, 3, S, S]

    def text_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in _batched(iter(data.captions[text_part.start:text_part.stop]), batch_size):
            encoded = tokenizer.batch_encode(batch, text_len)
            yield encoded["text_ids"].to(device), encoded["text_mask"].to(device)  # [B, L] each

    dummy_image = (torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype),)
    dummy_text = tuple(tokenizer.batch_encode([""], text_len)[k].to(device) for k in ("text_ids", "text_mask"))
    # Every rank runs as many batches as the largest slice needs.
    image_steps = math.ceil(math.ceil(num_images / world_size) / batch_size)
    text_steps = math.ceil(math.ceil(num_texts / world_size) / batch_size)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(image_part) + len(text_part), desc="retrieval eval", unit="item", file=sys.stderr,
               disable=rank != 0, leave=False, mininterval=0.5 if sys.stderr.isatty() else 60.0)
    try:
        with torch.no_grad():
            image_feats = _encode(model, image_batches(), image_steps, dummy_image, _image_features, bar)  # [i, D]
            text_feats = _encode(model, text_batches(), text_steps, dummy_text, _text_features, bar)  # [t, D]
    finally:
        bar.close()
        model.train(was_training)
    if world_size > 1:
        image_feats = _gather_rows(image_feats, [len(_slice(num_images, r, world_size)) for r in range(world_size)],
                                   group)
        text_feats = _gather_rows(text_feats, [len(_slice(num_texts, r, world_size)) for r in range(world_size)],
                                  group)
    metrics = recall_at_k(image_feats @ text_feats.t(), data.text_to_image, ks)  # sim [I, T]
    metrics.update(num_images=num_images, num_texts=num_texts, skipped_samples=sum(data.skipped.values()),
                   seconds=time.perf_counter() - start)
    return metrics
