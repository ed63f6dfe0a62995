"""Evaluation sets of the fusion-encoder tasks (VQA, NLVR2): an ordered index of examples, and their inputs.

The index is one pass over the shards in order (``resolve_shards``: a folder sorted by name, samples in file order)
that keeps each example's location and the few JSON fields evaluation needs; images are decoded later, by the rank
whose slice holds them (vlmo_ds.eval.sharded). Malformed samples are skipped and counted by kind (a VQA sample
without a question or an image, an NLVR2 sample without a sentence or one of its two images): every rank builds
the same index, so they agree on the set.

    VQA    fields question_id (int), question, answers (raw human answers; absent in test splits), answer_type,
           question_type, multiple_choice_answer
    NLVR2  fields identifier, sentence, label (bool; None in unlabelled splits)
Shapes: B batch, S image size, L text length.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlmo_ds.data.decode import SampleSkipped, decode_image, decode_json, image_member
from vlmo_ds.data.formats.nlvr2 import pair_members
from vlmo_ds.data.shard_reader import index_samples
from vlmo_ds.data.shards import ShardSource, resolve_shards
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.data.transforms import build_image_transform
from vlmo_ds.eval.sharded import (balanced_calls, evaluating, gather_rows, iter_samples, progress, rank_slice,
                                  slice_sizes, steps_needed)

logger = logging.getLogger(__name__)

_FIELDS = {"vqa": ("question_id", "question", "answers", "answer_type", "question_type", "multiple_choice_answer"),
           "nlvr2": ("identifier", "sentence", "label")}


@dataclass(frozen=True)
class Example:
    """One evaluation example: where its sample lives and the JSON fields evaluation reads."""

    url: str
    offset: int
    key: str
    fields: dict[str, Any]


@dataclass
class TaskSet:
    task: str
    examples: list[Example]
    skipped: Counter = field(default_factory=Counter)


def _fields(task: str, sample: dict[str, Any]) -> dict[str, Any]:
    meta = decode_json(sample)
    key = sample["__key__"]
    text_field = "question" if task == "vqa" else "sentence"
    if not isinstance(meta.get(text_field), str) or not meta[text_field].strip():
        raise SampleSkipped("bad_json", f"{key}: no {text_field}")
    fields = {name: meta[name] for name in _FIELDS[task] if name in meta}
    if task == "vqa":
        image_member(sample)
        if not isinstance(fields.get("question_id"), int):
            raise SampleSkipped("bad_json", f"{key}: question_id must be an integer")
    else:
        pair_members(sample)
        fields.setdefault("identifier", str(key))
        if not isinstance(fields.get("label"), (bool, type(None))):
            raise SampleSkipped("bad_json", f"{key}: label {fields['label']!r} is not true/false")
    return fields


def load_task_set(shards: ShardSource, task: str) -> TaskSet:
    """Index a VQA or NLVR2 split (see the module docstring); a truncated shard keeps the samples before the cut."""
    if task not in _FIELDS:
        raise ValueError(f"no evaluation set for task {task!r}; choose vqa or nlvr2")
    examples: list[Example] = []
    skipped: Counter = Counter()
    for url, offset, sample in index_samples(resolve_shards(shards).urls, skipped, f"{task} set"):
        try:
            examples.append(Example(url, offset, str(sample["__key__"]), _fields(task, sample)))
        except SampleSkipped as err:
            skipped[err.kind] += 1
    if skipped:
        logger.warning("%s set %s: skipped %s", task, shards, dict(skipped))
    if not examples:
        raise ValueError(f"no usable {task} example in {shards!r} (skipped: {dict(skipped)}); check that these are "
                         f"{task} shards (vlmo_ds.data.task_batches describes the layout)")
    return TaskSet(task, examples, skipped)


@dataclass
class TaskInputs:
    """Model inputs of a rank's examples: tokenized text and eval-transformed images (in the model's dtype)."""

    tokenizer: Tokenizer
    image_size: int
    text_len: int
    device: torch.device
    dtype: torch.dtype

    def _text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer.batch_encode(texts, self.text_len)
        return encoded["text_ids"].to(self.device), encoded["text_mask"].to(self.device)

    def batches(self, task: str, examples: Sequence[Example], batch_size: int) -> Iterator[tuple]:
        """VQA: (text_ids, text_mask, images); NLVR2: (text_ids, text_mask, images_0, images_1). [B, ...] each."""
        transform = build_image_transform(self.image_size, train=False)
        pixels = lambda data: transform(decode_image(data)).to(self.device, self.dtype)  # noqa: E731
        texts: list[str] = []
        images: list[list[torch.Tensor]] = []
        for example, sample in zip(examples, iter_samples(examples)):
            try:
                if sample is None:
                    raise SampleSkipped("no_image", "sample not found again")
                datas = [image_member(sample)] if task == "vqa" else list(pair_members(sample))
                images.append([pixels(data) for data in datas])
            except SampleSkipped as err:
                raise ValueError(f"{task} example {example.key} in {example.url} cannot be used ({err}); every "
                                 "rank must evaluate the same set: remove or re-encode the sample") from err
            texts.append(example.fields["question" if task == "vqa" else "sentence"])
            if len(texts) == batch_size:
                yield (*self._text(texts), *(torch.stack(column) for column in zip(*images)))
                texts, images = [], []
        if texts:
            yield (*self._text(texts), *(torch.stack(column) for column in zip(*images)))

    def dummy(self, task: str) -> tuple:
        image = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device, dtype=self.dtype)
        return (*self._text([""]), *([image] if task == "vqa" else [image, image]))


def predict_labels(model: nn.Module, predict: Callable[..., torch.Tensor], task: str, task_set: TaskSet,
                   inputs: TaskInputs, batch_size: int, rank: int, world_size: int,
                   group: dist.ProcessGroup | None) -> torch.Tensor:
    """[N] labels predict(model, *batch) gives every example of the set (the VQA answer, the NLVR2 truth value):
    each rank predicts its slice in the same number of model calls, then the slices are gathered, so every rank
    returns all N in order."""
    count = len(task_set.examples)
    part = rank_slice(count, rank, world_size)
    bar = progress(len(part), f"{task} eval", rank)
    try:
        with evaluating(model):
            outputs = balanced_calls(model, predict,
                                     inputs.batches(task, task_set.examples[part.start:part.stop], batch_size),
                                     steps_needed(count, world_size, batch_size), inputs.dummy(task), bar)
    finally:
        bar.close()
    local = torch.cat(outputs) if outputs else torch.zeros(0, dtype=torch.long, device=inputs.device)
    return gather_rows(local, slice_sizes(count, world_size), group).cpu()
