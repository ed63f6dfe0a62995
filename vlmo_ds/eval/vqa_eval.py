"""VQA evaluation of a fine-tuned VLMo over a split of VQA shards: predictions, the official score, the submission.

Each data-parallel rank predicts a contiguous slice of the questions (the arg-max of the VQA head over the answer
vocabulary), the predicted label indices are all-gathered, and every rank maps them to answer strings and scores
them with the official VQA metric (vlmo_ds.eval.vqa), so all ranks return the same metrics and one process gives
exactly the same. An annotated split (val, the synthetic vqa_val) is scored; a test split (test-dev, test) has no
answers and only gets predictions, which ``submission`` writes as the evaluation server's results file.

Beside the score, two baselines that read no image, computed on the same split's answers (so they are optimistic):
``majority`` answers every question with the split's most common answer; ``type_prior`` answers each question with
the most common answer of its answer type ("yes/no", "number", "other").
Shapes: Q questions, A answers, B batch.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlmo_ds.data.shards import ShardSource
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.eval.sharded import model_dtype
from vlmo_ds.eval.task_sets import TaskInputs, load_task_set, predict_labels
from vlmo_ds.eval.vqa import vqa_score, write_submission
from vlmo_ds.tasks.vqa import vqa_logits

logger = logging.getLogger(__name__)


def _predict(model: nn.Module, text_ids: torch.Tensor, text_mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """[B] arg-max answer labels."""
    return vqa_logits(model, text_ids, text_mask, images).argmax(dim=-1)


def baselines(questions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """vqa_score_majority and vqa_score_type_prior of annotated questions (see the module docstring)."""
    majors = [q.get("multiple_choice_answer") for q in questions]
    if not all(isinstance(m, str) for m in majors):
        return {}
    common = Counter(majors).most_common(1)[0][0]
    by_type: dict[Any, Counter] = {}
    for q in questions:
        by_type.setdefault(q.get("answer_type"), Counter())[q["multiple_choice_answer"]] += 1
    prior = {kind: counts.most_common(1)[0][0] for kind, counts in by_type.items()}
    return {"vqa_score_majority": vqa_score({q["question_id"]: common for q in questions}, questions).overall,
            "vqa_score_type_prior": vqa_score({q["question_id"]: prior[q.get("answer_type")] for q in questions},
                                              questions).overall}


def evaluate_vqa(model: nn.Module, shards: ShardSource, tokenizer: Tokenizer, answers: Sequence[str],
                 image_size: int, text_len: int, batch_size: int = 64, rank: int = 0, world_size: int = 1,
                 group: dist.ProcessGroup | None = None, device: str | torch.device = "cpu",
                 submission: str | os.PathLike | None = None) -> dict[str, float]:
    """VQA metrics of ``model`` (a VLMo with a VQA head, or an engine wrapping one) on a split.

    ``answers`` is the vocabulary the head was trained on (label i = answers[i]). ``rank``/``world_size``/
    ``group`` are the data-parallel ones. Returns vqa_score, vqa_score_<answer type>, the two baselines,
    num_questions, skipped_samples and seconds (test splits: no scores); rank 0 writes ``submission`` if given.
    """
    if world_size > 1 and not dist.is_initialized():
        raise ValueError(f"world_size={world_size} needs torch.distributed initialised (or pass world_size=1)")
    start = time.perf_counter()
    task_set = load_task_set(shards, "vqa")
    inputs = TaskInputs(tokenizer, image_size, text_len, torch.device(device), model_dtype(model))
    labels = predict_labels(model, _predict, "vqa", task_set, inputs, batch_size, rank, world_size, group)
    if int(labels.max()) >= len(answers):
        raise ValueError(f"the VQA head predicts label {int(labels.max())} but the answer vocabulary has "
                         f"{len(answers)} answers; evaluate with the vocabulary the model was fine-tuned on")
    questions = [e.fields for e in task_set.examples]
    predictions = {q["question_id"]: answers[int(label)] for q, label in zip(questions, labels)}
    if len(predictions) != len(questions):
        raise ValueError(f"{len(questions) - len(predictions)} question ids repeat in {shards!r}; each question "
                         "must appear once")
    metrics: dict[str, float] = {"num_questions": float(len(questions))}
    if all("answers" in q for q in questions):
        metrics.update(vqa_score(predictions, questions).as_metrics())
        metrics.update(baselines(questions))
    elif any("answers" in q for q in questions):
        raise ValueError("some questions of the split have answers and some do not; score an annotated split or "
                         "a test split, not a mixture")
    if submission is not None and rank == 0:
        logger.info("VQA predictions written to %s", write_submission(submission, predictions))
    metrics.update(skipped_samples=float(sum(task_set.skipped.values())), seconds=time.perf_counter() - start)
    return metrics
