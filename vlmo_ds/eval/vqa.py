"""The VQA score exactly as the official VQA evaluation computes it, and the test-dev / test submission file.

Per question, with the human answers a_1..a_n (n = 10 in VQA v2) and a predicted answer p:

    acc(p) = 1/n * sum_i min(1, #{j != i : a_j == p} / 3)

i.e. min(#humans that gave p / 3, 1) averaged over the n leave-one-out subsets of n - 1 humans (10 choose 9).
Before comparing, new lines and tabs become spaces and the strings are stripped; then, only when the humans did
not all give the same string, the answers and the prediction are normalised (vlmo_ds.data.formats.vqa_answers:
punctuation, articles, number words, contractions). That condition is the official evaluation's own: a
prediction "2" scores 0 against ten humans who all wrote "two". The data set score is the mean over questions,
also per answer type ("yes/no", "number", "other") and question type; the official tool prints 100 x the mean
rounded to 2 decimals, vlmo_ds keeps the unrounded fraction.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmo_ds.data.formats.vqa_answers import clean_whitespace, normalize_answer

HUMANS_FOR_FULL_CREDIT = 3


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official accuracy of one predicted answer against the human answers of one question, in [0, 1]."""
    if not answers:
        raise ValueError("a VQA question needs at least one human answer to be scored")
    humans = [clean_whitespace(a) for a in answers]
    predicted = clean_whitespace(prediction)
    if len(set(humans)) > 1:
        humans = [normalize_answer(a) for a in humans]
        predicted = normalize_answer(predicted)
    matches = sum(a == predicted for a in humans)
    # leaving out human i removes one match exactly when human i gave the predicted answer
    return sum(min(1.0, (matches - (a == predicted)) / HUMANS_FOR_FULL_CREDIT) for a in humans) / len(humans)


@dataclass
class VqaScore:
    """The score of a prediction set: overall and by answer / question type (fractions in [0, 1])."""

    overall: float
    num_questions: int
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question_type: dict[str, float] = field(default_factory=dict)
    per_question: dict[int, float] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        """Flat metrics for metrics.jsonl: vqa_score, vqa_score_<answer type> ("yes/no" -> yes_no), num_questions."""
        out = {"vqa_score": self.overall, "num_questions": float(self.num_questions)}
        for kind, value in sorted(self.per_answer_type.items()):
            out[f"vqa_score_{re.sub(r'[^0-9a-zA-Z]+', '_', kind)}"] = value
        return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def vqa_score(predictions: Mapping[int, str], questions: Iterable[Mapping[str, Any]],
              strict: bool = True) -> VqaScore:
    """Score ``predictions`` (question_id -> answer) on ``questions``, each a mapping with "question_id" and
    "answers" (the raw human answers, as the VQA shards' JSON holds them) and optionally "answer_type" and
    "question_type".

    As the official tool, ``strict`` requires exactly one prediction per question: a missing or an extra question
    id raises ValueError. With ``strict=False`` a missing prediction scores 0 and extra ones are ignored.
    """
    scores: dict[int, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for question in questions:
        qid = question["question_id"]
        if qid in scores:
            raise ValueError(f"question {qid} is listed twice; each question must be scored once")
        if qid not in predictions and strict:
            raise ValueError(f"no prediction for question {qid}; predict every question (or pass strict=False "
                             "to score missing predictions as 0)")
        answer = predictions.get(qid)
        scores[qid] = 0.0 if answer is None else vqa_accuracy(answer, question["answers"])
        if question.get("answer_type") is not None:
            by_answer_type[question["answer_type"]].append(scores[qid])
        if question.get("question_type") is not None:
            by_question_type[question["question_type"]].append(scores[qid])
    if not scores:
        raise ValueError("no questions to score")
    extra = set(predictions) - set(scores)
    if extra and strict:
        raise ValueError(f"{len(extra)} predictions for questions not in the set (e.g. {sorted(extra)[:5]}); "
                         "score the predictions on the questions they were made for")
    return VqaScore(_mean(list(scores.values())), len(scores),
                    {k: _mean(v) for k, v in by_answer_type.items()},
                    {k: _mean(v) for k, v in by_question_type.items()}, scores)


def write_submission(path: str | os.PathLike, predictions: Mapping[int, str]) -> Path:
    """Write the evaluation server's results file, ``[{"question_id": int, "answer": str}, ...]`` sorted by question
    id (e.g. vqa_test-dev2015_vlmo_results.json for test-dev), atomically; returns its path."""
    rows = []
    for qid, answer in sorted(predictions.items()):
        if not isinstance(qid, int) or isinstance(qid, bool) or not isinstance(answer, str):
            raise ValueError(f"prediction {qid!r}: {answer!r} must map an int question id to a string answer")
        rows.append({"question_id": qid, "answer": answer})
    if not rows:
        raise ValueError("no predictions to write")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows), encoding="utf-8")
    os.replace(tmp, path)
    return path
