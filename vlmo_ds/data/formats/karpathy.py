"""COCO and Flickr30K in Karpathy's splits (dataset_coco.json, dataset_flickr30k.json) as retrieval shards.

Input: the Karpathy JSON, ``{"images": [{"filename", "filepath" (COCO only), "split", "sentences": [{"raw",
"tokens", ...}], "cocoid" (COCO only), "imgid", "sentids"}, ...]}``, and the image folder: for COCO the folder that
holds train2014/ and val2014/ (an image is looked up as ROOT/filepath/filename, then ROOT/filename), for Flickr30K
the folder of the *.jpg files.

Output, one sample per image (the synthetic retrieval splits' layout, read by vlmo_ds.eval.retrieval):
    KEY.jpg    the image file's bytes, unchanged
    KEY.txt    the first caption
    KEY.json   {"captions": [every raw caption, stripped], "image_id": cocoid (COCO) or the file name's number
               (Flickr30K), "filename", "split" (Karpathy's), "imgid", "sentids"}
Splits: train, val, test; Karpathy's "restval" (30,504 COCO images) joins train as in the published VLMo / ViLT
fine-tuning, or is written as its own split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlmo_ds.data.formats.convert import Record
from vlmo_ds.data.formats.images import first_existing
from vlmo_ds.data.formats.report import ConversionReport

KARPATHY_SPLITS = ("train", "restval", "val", "test")
INPUT = "(input)"  # the report's name for records whose split cannot be told


def load_karpathy_json(path: str | os.PathLike) -> list[Any]:
    """The "images" list of a Karpathy split file; ValueError/FileNotFoundError when the file is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Karpathy split file {path}; give dataset_coco.json or dataset_flickr30k.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); download the Karpathy splits again") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} has no 'images' list: it is not a Karpathy split file (dataset_coco.json)")
    return data["images"]


def _captions(sentences: list[Any]) -> list[str]:
    captions = []
    for sentence in sentences:
        if not isinstance(sentence, dict):
            continue
        raw = sentence.get("raw")
        if not isinstance(raw, str):  # "tokens" is the fallback Karpathy's files always carry
            tokens = sentence.get("tokens")
            raw = " ".join(t for t in tokens if isinstance(t, str)) if isinstance(tokens, list) else ""
        if raw.strip():
            captions.append(raw.strip())
    return captions


def _image_id(entry: dict[str, Any], filename: str) -> int | str:
    if isinstance(entry.get("cocoid"), int):
        return entry["cocoid"]
    stem = Path(filename).stem
    return int(stem) if stem.isdigit() else stem


def karpathy_records(path: str | os.PathLike, image_root: str | os.PathLike, report: ConversionReport,
                     restval: str = "train") -> dict[str, list[Record]]:
    """Records by output split (train, val, test, and restval unless ``restval="train"`` merges it into train).

    Entries without a file name or known split are reported as bad_record, images without captions as
    no_caption; both are left out. Missing image files are found (and reported) when the split is written.
    """
    if restval not in ("train", "restval"):
        raise ValueError(f"restval={restval!r} must be 'train' (merge into train) or 'restval' (its own split)")
    root = Path(image_root)
    splits = ["train", "val", "test"] + (["restval"] if restval == "restval" else [])
    out: dict[str, list[Record]] = {name: [] for name in splits}
    for index, entry in enumerate(load_karpathy_json(path)):
        filename = entry.get("filename") if isinstance(entry, dict) else None
        split = entry.get("split") if isinstance(entry, dict) else None
        if not isinstance(filename, str) or not filename or split not in KARPATHY_SPLITS:
            report.split(INPUT).problem("bad_record", f"images[{index}] (filename {filename!r}, split {split!r})")
            continue
        target = "train" if split == "restval" and restval == "train" else split
        sentences = entry.get("sentences")
        captions = _captions(sentences if isinstance(sentences, list) else [])
        if not captions:
            report.split(target).problem("no_caption", filename)
            continue
        folder = entry.get("filepath")
        candidates = [root / folder / filename] if isinstance(folder, str) and folder else []
        meta = {"captions": captions, "image_id": _image_id(entry, filename), "filename": filename, "split": split,
                "imgid": entry.get("imgid"), "sentids": entry.get("sentids", [])}
        image = first_existing([*candidates, root / filename], root)
        out[target].append(Record(filename, meta, (("", image),), captions[0]))
    return out
