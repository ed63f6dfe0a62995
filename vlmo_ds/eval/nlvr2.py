"""NLVR2 accuracy and consistency as the official evaluation (lil-lab/nlvr, nlvr2/eval/metrics.py) computes them.

accuracy     the fraction of examples whose predicted label is the true one
consistency  the fraction of distinct sentences all of whose examples are right; the examples of one sentence
             share their identifier but for the pair number: "dev-850-0-0", "dev-850-1-0", ... -> "dev-850--0"
The official tool reads predictions as a CSV of ``identifier,True|False`` lines; ``write_predictions`` writes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def sentence_key(identifier: str) -> str:
    """The identifier with its pair number blanked: the examples sharing it have the same sentence."""
    parts = identifier.split("-")
    if len(parts) < 3:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not split-set-pair-sentence")
    parts[2] = ""
    return "-".join(parts)


def _as_bool(value: object, what: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ValueError(f"{what} is {value!r}; NLVR2 labels and predictions are True or False")


def nlvr2_metrics(predictions: Mapping[str, bool], labels: Mapping[str, bool],
                  strict: bool = True) -> dict[str, float]:
    """accuracy, consistency, num_examples and num_sentences of ``predictions`` (identifier -> bool) against
    ``labels`` (identifier -> bool). ``strict`` (the official rule) raises ValueError when an example has no
    prediction; otherwise a missing prediction counts as wrong. Predictions for unknown identifiers are ignored."""
    if not labels:
        raise ValueError("no labelled examples to score")
    correct = 0
    consistent: dict[str, bool] = {}
    for identifier, label in labels.items():
        key = sentence_key(identifier)
        if identifier not in predictions and strict:
            raise ValueError(f"no prediction for {identifier}; predict every example (or pass strict=False)")
        right = (identifier in predictions
                 and _as_bool(predictions[identifier], f"prediction {identifier}") == _as_bool(label, identifier))
        correct += right
        consistent[key] = consistent.get(key, True) and right
    return {"accuracy": correct / len(labels), "consistency": sum(consistent.values()) / len(consistent),
            "num_examples": float(len(labels)), "num_sentences": float(len(consistent))}


def write_predictions(path: str | os.PathLike, predictions: Mapping[str, bool]) -> Path:
    """Write ``identifier,True|False`` lines, the official evaluation's input, sorted by identifier (atomically)."""
    lines = [f"{identifier},{_as_bool(value, identifier)}" for identifier, value in sorted(predictions.items())]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
