"""VQA v2 (questions + annotations JSON files and the COCO images) as VQA shards with the answer table.

Input, as downloaded from visualqa.org into one folder (``--root``), the COCO images in another (``--images``, the
folder holding train2014/, val2014/, test2015/):
    v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015,test2015}_questions.json
        {"data_subtype", "questions": [{"question_id", "image_id", "question"}, ...], ...}
    v2_mscoco_{train2014,val2014}_annotations.json
        {"annotations": [{"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
                          "answers": [{"answer", "answer_confidence", "answer_id"} x 10]}, ...], ...}
    images: IMAGES/<train2014|val2014|test2015>/COCO_<folder>_<image_id, 12 digits>.jpg (test-dev uses test2015)

Output, one sample per question (the synthetic vqa splits' layout, extended):
    KEY.jpg    the COCO image's bytes
    KEY.json   {"question_id", "image_id", "question", and where annotated: "answers" (the raw human answers, in
               answer_id order: what the official metric scores against), "answer_counts" {normalised answer:
               humans}, "labels" / "scores" (vocabulary indices and soft scores, the training target),
               "multiple_choice_answer", "answer_type", "question_type"}
    answer_vocab.json at the output root: {"answers": [...], "min_count", "sources"}; label i is answers[i].
A question whose answers are all outside the vocabulary is written with empty labels and noted ``no_label``
(the published code leaves such questions out of training; a VQA task can filter on ``labels``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmo_ds.data.formats.convert import Record
from vlmo_ds.data.formats.images import first_existing
from vlmo_ds.data.formats.report import SplitReport
from vlmo_ds.data.formats.shard_writer import write_json_atomic
from vlmo_ds.data.formats.vqa_answers import (DEFAULT_MIN_COUNT, answer_counts, answer_targets, build_answer_vocab,
                                              vocab_index)

VOCAB_FILE = "answer_vocab.json"
_OFFICIAL = {  # split: (questions file, annotations file or None, COCO image folder)
    "train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "train2014"),
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
    "test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
    "test": ("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015"),
}
VQA_SPLITS = tuple(_OFFICIAL)


@dataclass(frozen=True)
class VqaSplitFiles:
    """The files of one VQA split: questions, annotations (None for test splits), and the COCO image folder name."""

    questions: Path
    annotations: Path | None
    image_folder: str


def official_split_files(root: str | os.PathLike, split: str) -> VqaSplitFiles:
    """The official file names of ``split`` (train, val, test-dev, test) under ``root``."""
    if split not in _OFFICIAL:
        raise ValueError(f"unknown VQA v2 split {split!r}; expected one of {VQA_SPLITS}")
    questions, annotations, folder = _OFFICIAL[split]
    return VqaSplitFiles(Path(root) / questions, Path(root) / annotations if annotations else None, folder)


def available_splits(root: str | os.PathLike) -> list[str]:
    """The splits whose questions file is in ``root``."""
    return [s for s in VQA_SPLITS if official_split_files(root, s).questions.is_file()]


def _json_list(path: Path, key: str) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no VQA file {path}; download it from visualqa.org or leave its split out")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); download it again") from err
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path} has no {key!r} list: it is not a VQA {key} file")
    return data[key]


def build_vocab(annotation_files: Iterable[Path], min_count: int = DEFAULT_MIN_COUNT) -> list[str]:
    """The answer table from the annotation files' multiple_choice_answer fields, read in the given order
    (train then val reproduces the published 3129-answer table and its label order)."""
    majors = []
    for path in annotation_files:
        majors += [a["multiple_choice_answer"] for a in _json_list(path, "annotations")
                   if isinstance(a, dict) and isinstance(a.get("multiple_choice_answer"), str)]
    return build_answer_vocab(majors, min_count)


def vocab_record(vocab: Sequence[str], min_count: int | None, sources: Sequence[str]) -> dict:
    """The content of an answer_vocab.json: {"answers", "min_count" (None for a table reused from elsewhere),
    "sources"}."""
    return {"answers": list(vocab), "min_count": min_count, "sources": list(sources)}


def save_vocab(path: Path, vocab: Sequence[str], min_count: int | None, sources: Sequence[str]) -> None:
    """Write answer_vocab.json (vocab_record)."""
    write_json_atomic(path, vocab_record(vocab, min_count, sources))


def load_vocab(path: str | os.PathLike) -> list[str]:
    """The answers of an answer_vocab.json (label i is answers[i])."""
    path = Path(path)
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))["answers"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an answer vocabulary written by tools/make_shards.py vqa2: {err}") from err
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{path}: 'answers' must be a list of strings")
    return answers


def _annotations(path: Path, question_ids: set[int], report: SplitReport) -> dict[int, dict[str, Any]]:
    by_question = {}
    for index, ann in enumerate(_json_list(path, "annotations")):
        qid = ann.get("question_id") if isinstance(ann, dict) else None
        answers = ann.get("answers") if isinstance(ann, dict) else None
        if not isinstance(qid, int) or not isinstance(answers, list) or not all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            report.problem("bad_record", f"{path.name} annotations[{index}]")
        elif qid not in question_ids:
            report.problem("no_question", f"question {qid}")
        else:
            by_question[qid] = ann
    return by_question


def _image_path(root: Path, folder: str, image_id: int) -> Path:
    official = f"COCO_{folder}_{image_id:012d}.jpg"
    return first_existing([root / folder / official, root / folder / f"{image_id:012d}.jpg", root / official], root)


def vqa_records(files: VqaSplitFiles, image_root: str | os.PathLike, vocab: Sequence[str], report: SplitReport,
                count_raw_answers: bool = False) -> list[Record]:
    """Records of one split in the questions file's order.

    Malformed questions or annotations are reported as bad_record, annotations of unknown questions as
    no_question, and (in an annotated split) questions without an annotation or without any non-blank answer as
    no_answers; all are left out. ``count_raw_answers`` counts human answers unnormalised for the soft scores,
    as the published table scripts did.
    """
    root, index = Path(image_root), vocab_index(vocab)
    questions = []
    for position, q in enumerate(_json_list(files.questions, "questions")):
        if (not isinstance(q, dict) or not isinstance(q.get("question_id"), int)
                or not isinstance(q.get("image_id"), int) or not isinstance(q.get("question"), str)):
            report.problem("bad_record", f"{files.questions.name} questions[{position}]")
        else:
            questions.append(q)
    anns = None
    if files.annotations is not None:
        anns = _annotations(files.annotations, {q["question_id"] for q in questions}, report)
    images: dict[int, Path] = {}
    records = []
    for q in questions:
        qid, image_id = q["question_id"], q["image_id"]
        meta: dict[str, Any] = {"question_id": qid, "image_id": image_id, "question": q["question"]}
        if anns is not None:
            ann = anns.get(qid)
            answers = [a["answer"] for a in ann["answers"]] if ann else []
            if not any(a.strip() for a in answers):
                report.problem("no_answers", f"question {qid}")
                continue
            counts = answer_counts(answers, normalize=not count_raw_answers)
            labels, scores = answer_targets(counts, index)
            if not labels:
                report.note("no_label", f"question {qid}")
            meta.update(answers=answers, answer_counts=counts, labels=labels, scores=scores,
                        multiple_choice_answer=ann.get("multiple_choice_answer"),
                        answer_type=ann.get("answer_type"), question_type=ann.get("question_type"))
        if image_id not in images:
            images[image_id] = _image_path(root, files.image_folder, image_id)
        records.append(Record(f"question {qid}", meta, (("", images[image_id]),)))
    return records
