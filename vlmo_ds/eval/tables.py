"""Text tables of the fine-tuning evaluations, each metric beside its baseline (what a model that ignores the image,
or ranks at random, would get), in percent.

    retrieval  the recall table of vlmo_ds.eval.metrics.format_table, and the same for the ITM re-ranked recalls
    vqa        VQA score overall and per answer type; baselines: the majority answer, the answer-type prior
    nlvr2      accuracy (and consistency where the identifiers allow it); baseline: the majority label
    summary    R@1, VQA score, NLVR2 accuracy and text MLM accuracy of every stage of a run, one row each (the quick
               start's closing table)
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


def summary_table(outcomes: Mapping) -> str:
    """Every evaluation of a run's stages (vlmo_ds.train.stage_loop.StageOutcome by name) in one table, in
    percent, each beside its baseline: chance for retrieval, unigram for text MLM, the majority answer / label."""
    rows = [("metric %", "value", "baseline")]

    def recall(label: str, found: dict) -> None:
        """TR@1 and IR@1 rows, and the ITM re-ranked ones where the evaluation re-ranked."""
        reranked = f"{label}, re-ranked by ITM (top {int(found.get('rerank_k', 0))})"
        for prefix, name in (("", label), ("rerank_", reranked)):
            if f"{prefix}tr@1" not in found:
                continue
            for direction in ("tr", "ir"):
                rows.append((f"{name} {direction.upper()}@1", found[f"{prefix}{direction}@1"],
                             f"{100 * found[f'chance_{direction}@1']:.2f} chance"))

    for name, outcome in outcomes.items():
        if outcome.text_mlm:
            rows.append((f"{name}: held-out text MLM accuracy", outcome.text_mlm["accuracy"],
                         f"{100 * outcome.text_mlm['unigram']:.2f} unigram"))
        if outcome.retrieval:
            recall(f"{name}: zero-shot retrieval", outcome.retrieval)
        task = outcome.task
        if not task:
            continue
        if "tr@1" in task:
            recall(f"{name}: fine-tuned retrieval", task)
        if "vqa_score" in task:
            rows.append((f"{name}: VQA score", task["vqa_score"],
                         f"{100 * task['vqa_score_majority']:.2f} majority answer"))
        if "accuracy" in task and "majority" in task:
            rows.append((f"{name}: NLVR2 accuracy", task["accuracy"], f"{100 * task['majority']:.2f} majority label"))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{rows[0][0].ljust(width)}{rows[0][1]:>8}   {rows[0][2]}"]
    lines += [f"{label.ljust(width)}{100 * value:8.2f}   {baseline}" for label, value, baseline in rows[1:]]
    return "\n".join(lines)
