"""The fine-tuning heads of VLMo, as published: module layout and key names match the published checkpoints.

    vqa_classifier    Linear(D, 2D) - LayerNorm(2D) - GELU - Linear(2D, answers) on the pooler output
                      (keys vqa_classifier.0 / .1 / .3)
    nlvr2_classifier  Linear(2D, 2D) - LayerNorm(2D) - GELU - Linear(2D, 2) on the two pooler outputs concatenated
                      (keys nlvr2_classifier.0 / .1 / .3)

A head is attached to a VLMo as a top-level submodule under that name, so the model's state dict, the published
export / import (vlmo_ds.model.published) and the stage records carry it like any other parameter. Initialisation
is the published one: N(0, 0.02) weights, zero biases, unit LayerNorms (torch's default LayerNorm eps, 1e-5, as
there). The heads are replicated on every tensor-parallel rank (they are small).
Shapes: B batch, D model dim, A answers.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmo_ds.model.vlmo import VLMo

VQA_HEAD = "vqa_classifier"
NLVR2_HEAD = "nlvr2_classifier"
HEADS = {"vqa": VQA_HEAD, "nlvr2": NLVR2_HEAD}
"""Task name -> the head's attribute (and state-dict prefix); retrieval fine-tuning adds no head."""


def _classifier(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """Linear - LayerNorm - GELU - Linear; indices 0, 1, 3 hold the parameters (the published keys)."""
    head = nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, out_features))
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return head


def vqa_head(dim: int, num_answers: int) -> nn.Sequential:
    """[B, D] pooled -> [B, A] answer logits."""
    if num_answers < 1:
        raise ValueError(f"num_answers={num_answers}: the VQA head needs an answer vocabulary of at least one answer")
    return _classifier(dim, 2 * dim, num_answers)


def nlvr2_head(dim: int) -> nn.Sequential:
    """[B, 2D] two pooled vectors -> [B, 2] logits (False, True)."""
    return _classifier(2 * dim, 2 * dim, 2)


def attach_head(model: VLMo, task: str, num_answers: int | None = None) -> nn.Module:
    """Add the task's head to `model` (under its published name) and return it; retrieval has none (returns None).

    VQA needs `num_answers` (3129 for the VQA v2 table). An existing head of the same shape is kept as it is.
    """
    if task not in HEADS:
        if task == "retrieval":
            return None
        raise ValueError(f"unknown fine-tuning task {task!r}; choose vqa, nlvr2 or retrieval")
    name = HEADS[task]
    if task == "vqa":
        if num_answers is None:
            raise ValueError("a VQA head needs num_answers (the size of the answer vocabulary)")
        head = vqa_head(model.cfg.dim, num_answers)
    else:
        head = nlvr2_head(model.cfg.dim)
    existing = getattr(model, name, None)
    if existing is not None:
        same = [p.shape for p in existing.parameters()] == [p.shape for p in head.parameters()]
        if not same:
            raise ValueError(f"the model already has a {name} of another shape; build a fresh model for this task")
        return existing
    model.add_module(name, head)
    return head


def head_answers(state: dict[str, torch.Tensor]) -> int | None:
    """The number of answers of the VQA head a state dict holds (None when it holds none)."""
    weight = state.get(f"{VQA_HEAD}.3.weight")
    return None if weight is None else int(weight.shape[0])
