"""Text tables of the fine-tuning evaluations, each metric beside its baseline (what a model that ignores the image,
or ranks at random, would get), in percent.

    retrieval  the recall table of vlmo_ds.eval.metrics.format_table, and the same for the ITM re-ranked recalls
    vqa        VQA score overall and per answer type; baselines: the majority answer, the answer-type prior
    nlvr2      accuracy (and consistency where the identifiers allow it); baseline: the majority label
"""
from __future__ import annotations

from collections.abc import Mapping

from vlmo_ds.eval.metrics import format_table


def _row(label: str, value: float | None, baseline: str = "") -> str:
    shown = "-" if value is None else f"{100 * value:.2f}"
    return f"{label.ljust(24)}{shown.rjust(8)}{('   ' + baseline) if baseline else ''}"


def retrieval_table(metrics: Mapping[str, float]) -> str:
    text = format_table(metrics)
    if "rerank_k" in metrics:
        reranked = {k.removeprefix("rerank_"): v for k, v in metrics.items() if k.startswith("rerank_")}
        reranked.update({k: v for k, v in metrics.items() if k.startswith("chance_")})
        text += f"\nre-ranked by ITM, top {int(metrics['rerank_k'])} candidates:\n" + format_table(reranked)
    return text


def vqa_table(metrics: Mapping[str, float]) -> str:
    lines = [f"VQA, {int(metrics['num_questions'])} questions"]
    if "vqa_score" not in metrics:
        return lines[0] + " (no answers in the split: predictions only)"
    baseline = (f"majority answer {100 * metrics.get('vqa_score_majority', 0):.2f}, answer-type prior "
                f"{100 * metrics.get('vqa_score_type_prior', 0):.2f}")
    lines.append(_row("VQA score %", metrics["vqa_score"], baseline))
    for key in sorted(metrics):
        if key.startswith("vqa_score_") and key not in ("vqa_score_majority", "vqa_score_type_prior"):
            lines.append(_row(f"  {key.removeprefix('vqa_score_')}", metrics[key]))
    return "\n".join(lines)


def nlvr2_table(metrics: Mapping[str, float]) -> str:
    lines = [f"NLVR2, {int(metrics['num_examples'])} examples"]
    if "accuracy" not in metrics:
        return lines[0] + " (no labels in the split: predictions only)"
    lines.append(_row("accuracy %", metrics["accuracy"], f"majority label {100 * metrics['majority']:.2f}"))
    if "consistency" in metrics:
        lines.append(_row("consistency %", metrics["consistency"]))
    return "\n".join(lines)


def task_table(task: str, metrics: Mapping[str, float]) -> str:
    """The table of one task's evaluation metrics."""
    tables = {"retrieval": retrieval_table, "vqa": vqa_table, "nlvr2": nlvr2_table}
    if task not in tables:
        raise ValueError(f"no table for task {task!r}; choose one of {', '.join(tables)}")
    return tables[task](metrics)
