"""NLVR2 (the JSON-lines files and their image pairs) as NLVR2 shards.

Input, as released by lil-lab/nlvr: ``--data`` the folder of train.json, dev.json, test1.json (test-P; and
test2.json, test-U, if you have it), one JSON object a line: {"identifier": "dev-850-0-0", "sentence",
"label": "True" | "False", "directory" (train only), "left_url", "right_url", "synset", ...}. The identifier is
``split-set-pair-sentence``; the pair's images are named ``split-set-pair-img0.png`` (left) and ``-img1.png``
(right), under ``--images``: train images in images/train/<directory>/ (or train/<directory>/), the others in
<split>/ (or images/<split>/); a flat folder of all images works too.

Output, one sample per line (the synthetic nlvr2 splits' layout):
    KEY.left.<ext>, KEY.right.<ext>   the two images' bytes; <ext> is what the bytes are (many NLVR2 "*.png" files
                                      hold JPEG data and become left.jpg); ``pair_members`` finds them
    KEY.json   {"identifier", "sentence", "label" (true/false; null where a file has no labels), "left_image",
               "right_image", "directory" (train)}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlmo_ds.data.decode import IMAGE_EXTS, SampleSkipped
from vlmo_ds.data.formats.convert import Record
from vlmo_ds.data.formats.images import first_existing
from vlmo_ds.data.formats.report import SplitReport

NLVR2_SPLITS = ("train", "dev", "test1", "test2")
_LABELS = {"true": True, "false": False}


def available_splits(data_dir: str | os.PathLike) -> list[str]:
    """The splits whose <split>.json file is in ``data_dir``."""
    return [s for s in NLVR2_SPLITS if (Path(data_dir) / f"{s}.json").is_file()]


def pair_image_names(identifier: str) -> tuple[str, str]:
    """The official file names of an example's left and right images: "dev-850-0-0" -> dev-850-0-img0.png, ..."""
    parts = identifier.split("-")
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"NLVR2 identifier {identifier!r} is not split-set-pair-sentence")
    stem = "-".join(parts[:3])
    return f"{stem}-img0.png", f"{stem}-img1.png"


def _image_path(root: Path, split: str, directory: str | None, name: str) -> Path:
    folders = [root / split, root / "images" / split]
    if directory:
        folders = [folders[0] / directory, folders[1] / directory, *folders]
    return first_existing([*(folder / name for folder in folders), root / name], root)


def _label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise ValueError(f"label {value!r} is neither True nor False")


def nlvr2_records(path: str | os.PathLike, image_root: str | os.PathLike, report: SplitReport) -> list[Record]:
    """Records of one JSON-lines file in line order.

    A line that is not a JSON object, or lacks a valid identifier or a sentence, is reported as bad_line
    ("file:line"); a label other than True/False as bad_label; a missing label is noted ``unlabelled`` and kept
    (label null). Missing images are reported when the split is written.
    """
    path, root = Path(path), Path(image_root)
    if not path.is_file():
        raise FileNotFoundError(f"no NLVR2 file {path}; give the folder holding train.json, dev.json, test1.json")
    records = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                example = json.loads(line)
                identifier, sentence = example["identifier"], example["sentence"]
                if not isinstance(identifier, str) or not isinstance(sentence, str) or not sentence.strip():
                    raise ValueError("identifier and sentence must be non-empty strings")
                left, right = pair_image_names(identifier)
            except (ValueError, KeyError, TypeError) as err:  # TypeError: a line that is JSON but not an object
                report.problem("bad_line", f"{where} ({type(err).__name__}: {err})")
                continue
            try:
                label = _label(example["label"]) if "label" in example else None
            except ValueError as err:
                report.problem("bad_label", f"{identifier} ({err})")
                continue
            if label is None:
                report.note("unlabelled", identifier)
            split = identifier.split("-")[0]
            directory = example.get("directory")
            directory = str(directory) if isinstance(directory, (str, int)) else None
            meta = {"identifier": identifier, "sentence": sentence.strip(), "label": label, "left_image": left,
                    "right_image": right}
            if directory is not None:
                meta["directory"] = directory
            images = (("left", _image_path(root, split, directory, left)),
                      ("right", _image_path(root, split, directory, right)))
            records.append(Record(identifier, meta, images))
    return records


def pair_members(sample: dict[str, Any]) -> tuple[bytes, bytes]:
    """The left and right image bytes of an NLVR2 sample (``left.jpg`` / ``left.png`` / ...); SampleSkipped
    ("no_image") when either is missing. Works for these shards and the synthetic nlvr2 splits alike."""
    found = []
    for side in ("left", "right"):
        data = next((sample[f"{side}.{ext}"] for ext in IMAGE_EXTS if f"{side}.{ext}" in sample), None)
        if data is None:
            raise SampleSkipped("no_image", f"{sample.get('__key__')}: no {side} image")
        found.append(data)
    return found[0], found[1]
