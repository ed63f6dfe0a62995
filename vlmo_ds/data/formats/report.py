"""What a shard conversion met: samples written, and every problem by kind with the names of the records it hit.

A converter never drops a record silently and never stops for a bad one: it records the problem here and moves on.
At the end the tool prints ``summary()`` and saves ``to_json()`` as ``conversion_report.json`` beside the shards.
Its ``files`` list names every file the run wrote (paths relative to the output folder): the record by which a later
run with ``--overwrite`` removes this run's files and nothing else (out_folder.py).

Problem kinds (the report's keys; a record that hits one is not written):
    missing_image   an image file named by the annotations does not exist
    escaping_path   an image path that leaves the image folder (``../x.jpg``, an absolute path): never read
    bad_image       an image file Pillow cannot identify (not an image, empty, unreadable)
    bad_line        a line of a JSON-lines or TSV file that does not parse, or lacks a field the format needs
    bad_record      a record of a JSON file that lacks a field the format needs, or holds a wrong type
    no_caption      an image without any non-blank caption
    no_answers      a VQA question without answers in a split that has annotations (or no annotation at all)
    no_question     a VQA annotation whose question is not in the questions file
    bad_label       an NLVR2 label that is neither True nor False
    bad_shard       an img2dataset shard that cannot be read as a tar file
    no_image        an img2dataset sample with no image member
Notes (counted and named too, but the record IS written): e.g. ``no_label`` (a VQA question none of whose answers
is in the vocabulary), ``reencoded`` (an image in a format the loaders do not read, stored as PNG).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROBLEM_KINDS = ("missing_image", "escaping_path", "bad_image", "bad_line", "bad_record", "no_caption", "no_answers", "no_question",
                 "bad_label", "bad_shard", "no_image")
REPORT_FILE = "conversion_report.json"
MAX_NAMES = 10_000  # names kept per kind and split; counts stay exact past it


@dataclass
class SplitReport:
    """One output split: how many samples and shards were written, problems and notes by kind."""

    written: int = 0
    shards: int = 0
    problems: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    names: dict[str, list[str]] = field(default_factory=dict)

    def _name(self, kind: str, name: str) -> None:
        kept = self.names.setdefault(kind, [])
        if len(kept) < MAX_NAMES:
            kept.append(name)

    def problem(self, kind: str, name: str) -> None:
        """Record that the record ``name`` was left out because of ``kind`` (one of PROBLEM_KINDS)."""
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {kind!r}; expected one of {PROBLEM_KINDS}")
        self.problems[kind] += 1
        self._name(kind, name)

    def note(self, kind: str, name: str) -> None:
        """Record something worth knowing about a record that was written all the same."""
        self.notes[kind] += 1
        self._name(kind, name)

    def to_json(self) -> dict[str, Any]:
        def entry(kind: str, count: int) -> dict[str, Any]:
            names = self.names.get(kind, [])
            return {"count": count, "names": names, "names_truncated": len(names) < count}

        return {"written": self.written, "shards": self.shards,
                "problems": {k: entry(k, n) for k, n in sorted(self.problems.items())},
                "notes": {k: entry(k, n) for k, n in sorted(self.notes.items())}}


@dataclass
class ConversionReport:
    """The report of one tool run: the format, its inputs, and a SplitReport per output split."""

    format: str
    inputs: dict[str, str] = field(default_factory=dict)
    splits: dict[str, SplitReport] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific facts, e.g. the vocabulary size
    files: list[str] = field(default_factory=list)  # what the run wrote, relative to the output folder

    def split(self, name: str) -> SplitReport:
        """The report of split ``name``, created on first use."""
        return self.splits.setdefault(name, SplitReport())

    @property
    def num_problems(self) -> int:
        return sum(sum(s.problems.values()) for s in self.splits.values())

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "inputs": self.inputs, **self.extra,
                "splits": {name: s.to_json() for name, s in self.splits.items()}, "files": self.files}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the report as conversion_report.json in ``folder`` (atomically) and return its path."""
        path = Path(folder) / REPORT_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def summary(self, show: int = 5) -> str:
        """Lines for people: per split the samples and shards written, then each problem and note with a few names."""
        lines = []
        for name, split in self.splits.items():
            lines.append(f"{self.format} {name}: {split.written} samples in {split.shards} shards")
            for label, counts in (("skipped", split.problems), ("note", split.notes)):
                for kind, count in sorted(counts.items()):
                    names = split.names.get(kind, [])[:show]
                    more = f", ... ({count - len(names)} more)" if count > len(names) else ""
                    lines.append(f"  {label} {kind}: {count} ({', '.join(names)}{more})")
        return "\n".join(lines)
