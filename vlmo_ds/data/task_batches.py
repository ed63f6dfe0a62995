"""Fine-tuning batches for VQA, NLVR2 and retrieval as StreamLoader pipelines (the synthetic splits and the shards
of vlmo_ds.data.formats share one layout per task).

    VQA        KEY.jpg + KEY.json {"question", and "labels"/"scores" (vocabulary indices and soft scores, the VQA v2
               shards) or "answers" (the raw human answers, scored here against the answer vocabulary)}
    NLVR2      KEY.left.<ext> + KEY.right.<ext> + KEY.json {"sentence", "label": true/false, "identifier"}
    retrieval  KEY.jpg + KEY.json {"captions": [...]} or KEY.txt (one caption); each time an image is drawn, one of
               its captions is drawn with it (the stream's generator), as the published retrieval fine-tuning does

Batches (B batch, T text length, S image size, A answers):
    VQA        image [B, 3, S, S], text_ids / text_mask / word_start [B, T], vqa_targets [B, A] float32, key, meta
    NLVR2      image_0 / image_1 [B, 3, S, S] (left, right), text_ids / text_mask / word_start [B, T],
               label [B] int64 (1 = true), key, meta
    retrieval  image [B, 3, S, S], text_ids / text_mask / word_start [B, T], key
A question none of whose answers is in the vocabulary keeps all-zero targets (the VQA v2 shards note those as
no_label); a malformed or unlabelled sample is skipped and counted as bad_json.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlmo_ds.data.decode import (DEFAULT_MAX_PIXELS, SampleSkipped, decode_image, decode_json, decode_text,
                                 image_member)
from vlmo_ds.data.formats.nlvr2 import pair_members
from vlmo_ds.data.formats.vqa_answers import answer_counts, answer_targets, vocab_index
from vlmo_ds.data.loader import StreamLoader
from vlmo_ds.data.pipelines import ImageTransform, _transform
from vlmo_ds.data.shards import ShardList, ShardSource
from vlmo_ds.data.tokenizer import Tokenizer, pad_encoded


def _encode(tokenizer: Tokenizer, text: str, text_len: int) -> tuple[list[int], list[bool]]:
    ids, starts = tokenizer.encode(text, text_len)
    return list(ids), list(starts)


def _text_field(meta: dict[str, Any], name: str, key: str) -> str:
    value = meta.get(name)
    if not isinstance(value, str) or not value.strip():
        raise SampleSkipped("bad_json", f"{key}: no {name} in the JSON")
    return value.strip()


def dense_targets(labels: list[list[int]], scores: list[list[float]], num_answers: int) -> torch.Tensor:
    """Per question (vocabulary labels, soft scores) -> [B, A] float32, zero where an answer was not given."""
    targets = torch.zeros(len(labels), num_answers, dtype=torch.float32)
    for row, (label, score) in enumerate(zip(labels, scores)):
        if len(label) != len(score):
            raise ValueError(f"question {row}: {len(label)} labels but {len(score)} scores")
        if label:
            targets[row, torch.tensor(label, dtype=torch.long)] = torch.tensor(score, dtype=torch.float32)
    return targets


def vqa_example_targets(meta: dict[str, Any], index: dict[str, int], key: str) -> tuple[list[int], list[float]]:
    """(labels, soft scores) of a question: the shard's own when it has them, else from its raw human answers."""
    labels, scores = meta.get("labels"), meta.get("scores")
    if isinstance(labels, list) and isinstance(scores, list) and len(labels) == len(scores):
        if not all(isinstance(label, int) and 0 <= label < len(index) for label in labels):
            raise SampleSkipped("bad_json", f"{key}: labels outside the {len(index)}-answer vocabulary; train with "
                                "the answer_vocab.json the shards were written with")
        return labels, [float(s) for s in scores]
    answers = meta.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise SampleSkipped("bad_json", f"{key}: neither labels/scores nor answers in the JSON")
    return answer_targets(answer_counts(answers), index)


@dataclass
class VqaPipeline:
    """Questions with their image; targets are soft scores over ``answers`` (the answer vocabulary)."""

    tokenizer: Tokenizer
    image_transform: ImageTransform
    text_len: int
    answers: Sequence[str]
    max_pixels: int = DEFAULT_MAX_PIXELS
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = vocab_index(self.answers)

    def expand(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        key = sample["__key__"]
        meta = decode_json(sample)
        ids, starts = _encode(self.tokenizer, _text_field(meta, "question", key), self.text_len)
        labels, scores = vqa_example_targets(meta, self._index, key)
        image = decode_image(image_member(sample), self.max_pixels)
        return [{"image": image, "ids": ids, "starts": starts, "labels": labels, "scores": scores, "key": key,
                 "meta": meta}]

    def finish(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return {**item, "image": _transform(self.image_transform, item["image"], rng)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([it["image"] for it in items]),
                **pad_encoded([(it["ids"], it["starts"]) for it in items], self.text_len, self.tokenizer.pad_id),
                "vqa_targets": dense_targets([it["labels"] for it in items], [it["scores"] for it in items],
                                             len(self.answers)),
                "key": [it["key"] for it in items], "meta": [it["meta"] for it in items]}


def nlvr2_label(meta: dict[str, Any], key: str) -> bool:
    label = meta.get("label")
    if not isinstance(label, bool):
        raise SampleSkipped("bad_json", f"{key}: label {label!r} is not true/false (an unlabelled test split "
                            "cannot train)")
    return label


@dataclass
class Nlvr2Pipeline:
    """A statement with its left and right images and a true/false label."""

    tokenizer: Tokenizer
    image_transform: ImageTransform
    text_len: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def expand(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        key = sample["__key__"]
        meta = decode_json(sample)
        ids, starts = _encode(self.tokenizer, _text_field(meta, "sentence", key), self.text_len)
        label = nlvr2_label(meta, key)
        left, right = (decode_image(data, self.max_pixels) for data in pair_members(sample))
        return [{"image_0": left, "image_1": right, "ids": ids, "starts": starts, "label": label, "key": key,
                 "meta": meta}]

    def finish(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return {**item, "image_0": _transform(self.image_transform, item["image_0"], rng),
                "image_1": _transform(self.image_transform, item["image_1"], rng)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image_0": torch.stack([it["image_0"] for it in items]),
                "image_1": torch.stack([it["image_1"] for it in items]),
                **pad_encoded([(it["ids"], it["starts"]) for it in items], self.text_len, self.tokenizer.pad_id),
                "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
                "key": [it["key"] for it in items], "meta": [it["meta"] for it in items]}


def sample_captions(sample: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """The JSON "captions" (non-blank strings) if any, else the .txt caption; SampleSkipped("no_caption")."""
    listed = meta.get("captions")
    if isinstance(listed, list):
        captions = [c.strip() for c in listed if isinstance(c, str) and c.strip()]
        if captions:
            return captions
    return [decode_text(sample)]


@dataclass
class RetrievalPipeline:
    """Images with several captions: each draw of an image comes with one of its captions, drawn at random."""

    tokenizer: Tokenizer
    image_transform: ImageTransform
    text_len: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def expand(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        captions = sample_captions(sample, decode_json(sample))
        encoded = [_encode(self.tokenizer, caption, self.text_len) for caption in captions]
        image = decode_image(image_member(sample), self.max_pixels)
        return [{"image": image, "encoded": encoded, "key": sample["__key__"]}]

    def finish(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        ids, starts = item["encoded"][int(rng.integers(len(item["encoded"])))]
        return {"image": _transform(self.image_transform, item["image"], rng), "ids": ids, "starts": starts,
                "key": item["key"]}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([it["image"] for it in items]),
                **pad_encoded([(it["ids"], it["starts"]) for it in items], self.text_len, self.tokenizer.pad_id),
                "key": [it["key"] for it in items]}


def vqa_loader(shards: ShardSource | ShardList, tokenizer: Tokenizer, image_transform: ImageTransform,
               answers: Sequence[str], *, batch_size: int, text_len: int, **options: Any) -> StreamLoader:
    """VQA batches; ``options`` are StreamLoader's keywords (dp_rank, dp_size, num_workers, seed, ...)."""
    return StreamLoader(shards, VqaPipeline(tokenizer, image_transform, text_len, answers), batch_size, **options)


def nlvr2_loader(shards: ShardSource | ShardList, tokenizer: Tokenizer, image_transform: ImageTransform, *,
                 batch_size: int, text_len: int, **options: Any) -> StreamLoader:
    """NLVR2 batches; ``options`` as vqa_loader's."""
    return StreamLoader(shards, Nlvr2Pipeline(tokenizer, image_transform, text_len), batch_size, **options)


def retrieval_loader(shards: ShardSource | ShardList, tokenizer: Tokenizer, image_transform: ImageTransform, *,
                     batch_size: int, text_len: int, **options: Any) -> StreamLoader:
    """Retrieval fine-tuning batches (one random caption per image draw); ``options`` as vqa_loader's."""
    return StreamLoader(shards, RetrievalPipeline(tokenizer, image_transform, text_len), batch_size, **options)
