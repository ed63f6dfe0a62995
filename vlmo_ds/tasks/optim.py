"""The head learning-rate multiplier of the published fine-tuning recipes (lr_mult: 20 for VQA).

The published code trains the parameters of the task heads (vqa_classifier, nlvr2_classifier) with lr x lr_mult and
everything else with lr, each with its own weight-decay rule. ``split_head_groups`` turns the trainer's AdamW groups
(vlmo_ds.train.optim.param_groups) into that layout: each group is split in a backbone part and a head part, the
head part tagged ``lr_scale``; the trainer's learning-rate setter (vlmo_ds.train.engine.set_lr) gives every group
``lr * lr_scale``. Empty groups are dropped (DeepSpeed's ZeRO optimizers cannot flatten them).
"""
from __future__ import annotations

from torch import nn

from vlmo_ds.tasks.heads import HEADS

LR_SCALE = "lr_scale"
HEAD_LR_MULT = {"vqa": 20.0, "nlvr2": 1.0}
"""The published head learning-rate multipliers (lr_mult) of the tasks with a head."""


def head_lr_mult(stage) -> float | None:
    """The task head's learning-rate multiplier of a stage (vlmo_ds.config.StageConfig): its head_lr_mult, else the
    published one; None for stages without a task head (pre-training, retrieval)."""
    if stage.kind not in HEAD_LR_MULT:
        return None
    return stage.head_lr_mult if stage.head_lr_mult is not None else HEAD_LR_MULT[stage.kind]


def is_head(name: str) -> bool:
    """Whether a parameter name belongs to a fine-tuning head (by its first path component)."""
    return name.split(".", 1)[0] in HEADS.values()


def split_head_groups(groups: list[dict], model: nn.Module, head_lr_mult: float) -> list[dict]:
    """AdamW groups with the task heads' parameters moved to groups of their own with lr_scale = head_lr_mult."""
    if head_lr_mult <= 0:
        raise ValueError(f"head_lr_mult={head_lr_mult} must be positive (published: 20 for VQA, 1 elsewhere)")
    heads = {id(p) for name, p in model.named_parameters() if is_head(name)}
    out = []
    for group in groups:
        base = [p for p in group["params"] if id(p) not in heads]
        head = [p for p in group["params"] if id(p) in heads]
        name = group.get("name", "group")
        if base:
            out.append({**group, "params": base})
        if head:
            out.append({**group, "params": head, "name": f"{name}_head", LR_SCALE: float(head_lr_mult)})
    return out
