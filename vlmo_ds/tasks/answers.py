"""Where a VQA task finds its answer vocabulary (label i of the VQA head is answers[i]).

    an answer_vocab.json file      {"answers": [...], ...} as tools/make_shards.py vqa2 writes it beside the split
                                   folders (3129 answers for VQA v2 train + val)
    a VQA shard folder             its answer_vocab.json, or the one in the folder above (the shard tool's layout)
    a synthetic VQA split          the synthetic generator's fixed table (vlmo_ds.data.synthetic.questions), when
                                   the folder above holds a synthetic manifest of the current version
Training and evaluation must use the same table: the fine-tuning stage records the one it used in its folder
(``answer_vocab_text``), and the evaluation command reads it from there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from vlmo_ds.data.formats.vqa2 import VOCAB_FILE, load_vocab, vocab_record
from vlmo_ds.data.synthetic import VERSION, read_manifest
from vlmo_ds.data.synthetic.questions import answer_vocabulary


def _synthetic_table(folder: Path) -> list[str] | None:
    for root in (folder, folder.parent):
        manifest = read_manifest(root)
        if manifest is None:
            continue
        if manifest.get("version") != VERSION:
            raise ValueError(f"{root} holds synthetic data of version {manifest.get('version')}, written by another "
                             f"generator than this one (version {VERSION}); its answers may differ: write it again "
                             "(python tools/make_synthetic.py)")
        return answer_vocabulary()
    return None


def load_answer_vocab(source: str | os.PathLike) -> list[str]:
    """The answer vocabulary of `source`: an answer_vocab.json, or a VQA shard folder (see the module docstring)."""
    path = Path(source)
    if path.is_file():
        return load_vocab(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no answer vocabulary at {path}: give an answer_vocab.json or a VQA shard folder")
    for candidate in (path / VOCAB_FILE, path.parent / VOCAB_FILE):
        if candidate.is_file():
            return load_vocab(candidate)
    synthetic = _synthetic_table(path)
    if synthetic is not None:
        return synthetic
    raise FileNotFoundError(f"no {VOCAB_FILE} in {path} or {path.parent}; write the VQA shards with "
                            "tools/make_shards.py vqa2 (it saves the table) or pass the table's file")


def answer_source(stage) -> str:
    """Where a vqa stage (vlmo_ds.config.StageConfig) reads its answer table: its `answers`, else its training
    shards' folder."""
    return stage.answers or stage.data[0].shards


def stage_answers(stage) -> list[str] | None:
    """A vqa stage's answer table (label i of the head is answers[i]); None for other stages."""
    return load_answer_vocab(answer_source(stage)) if stage.kind == "vqa" else None


def answer_vocab_text(answers: list[str], source: str) -> str:
    """answers as the text of an answer_vocab.json (the shard tool's format); source: where the table came from."""
    return json.dumps(vocab_record(answers, None, [source]), indent=2) + "\n"
