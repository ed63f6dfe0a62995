"""NLVR2 evaluation of a fine-tuned VLMo over a split of NLVR2 shards (dev, test-P = test1, the synthetic nlvr2_dev).

Each data-parallel rank predicts a contiguous slice of the examples (two fused passes and the NLVR2 head,
vlmo_ds.tasks.nlvr2), the predictions are all-gathered, and every rank scores them with the official accuracy and
consistency (vlmo_ds.eval.nlvr2), so all ranks return the same metrics and one process gives exactly the same.
Consistency needs the official identifiers (split-set-pair-sentence); with other identifiers (the synthetic set's
"dev-12") it is left out. ``majority`` is the accuracy of always answering the split's more common label.
An unlabelled split only gets predictions, which ``predictions`` writes in the official CSV form.
Shapes: N examples, B batch.
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from vlmo_ds.data.shards import ShardSource
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.eval.nlvr2 import nlvr2_metrics, write_predictions
from vlmo_ds.eval.sharded import model_dtype
from vlmo_ds.eval.task_sets import TaskInputs, load_task_set, predict_labels
from vlmo_ds.tasks.nlvr2 import nlvr2_logits

logger = logging.getLogger(__name__)


def _predict(model: nn.Module, text_ids: torch.Tensor, text_mask: torch.Tensor, image_0: torch.Tensor,
             image_1: torch.Tensor) -> torch.Tensor:
    """[B] 1 where the statement is predicted true."""
    return nlvr2_logits(model, text_ids, text_mask, image_0, image_1).argmax(dim=-1)


def _official_ids(identifiers: list[str]) -> bool:
    return all(len(i.split("-")) >= 3 for i in identifiers)


def evaluate_nlvr2(model: nn.Module, shards: ShardSource, tokenizer: Tokenizer, image_size: int, text_len: int,
                   batch_size: int = 64, rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None,
                   device: str | torch.device = "cpu", predictions: str | os.PathLike | None = None
                   ) -> dict[str, float]:
    """NLVR2 metrics of ``model`` (a VLMo with an NLVR2 head and three modality types, or an engine wrapping one):
    accuracy, consistency (official identifiers only), majority, num_examples, skipped_samples, seconds."""
    if world_size > 1 and not dist.is_initialized():
        raise ValueError(f"world_size={world_size} needs torch.distributed initialised (or pass world_size=1)")
    start = time.perf_counter()
    task_set = load_task_set(shards, "nlvr2")
    inputs = TaskInputs(tokenizer, image_size, text_len, torch.device(device), model_dtype(model))
    count = len(task_set.examples)
    predicted = predict_labels(model, _predict, "nlvr2", task_set, inputs, batch_size, rank, world_size, group).tolist()
    identifiers = [e.fields["identifier"] for e in task_set.examples]
    answers = {identifier: bool(p) for identifier, p in zip(identifiers, predicted)}
    if len(answers) != count:
        raise ValueError(f"identifiers repeat in {shards!r}; each NLVR2 example must appear once")
    labels = {e.fields["identifier"]: e.fields.get("label") for e in task_set.examples}
    metrics: dict[str, float] = {"num_examples": float(count)}
    if all(isinstance(v, bool) for v in labels.values()):
        if _official_ids(identifiers):
            metrics.update(nlvr2_metrics(answers, labels))
        else:
            metrics["accuracy"] = sum(answers[i] == labels[i] for i in identifiers) / count
        true = sum(labels.values())
        metrics["majority"] = max(true, count - true) / count
    if predictions is not None and rank == 0:
        logger.info("NLVR2 predictions written to %s", write_predictions(predictions, answers))
    metrics.update(skipped_samples=float(sum(task_set.skipped.values())), seconds=time.perf_counter() - start)
    return metrics
