"""AdamW parameter groups and the learning-rate schedule.

No weight decay for: every bias (incl. the attention q/v biases and the MLM output bias), every LayerNorm (incl. the
per-expert norm2_text / norm2_imag / norm2_vl), layer-scale gammas, logit scales (all of them: tensors of fewer than
two dimensions), and the position-like tensors: the relative position table, I_CLS, the absolute image positions and
the MIM mask token. The published code picks groups by substring and so decays the per-expert LayerNorms; the rule
here is by shape and by name of those few tensors, so it covers every expert.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

NO_DECAY_TENSORS = ("relative_position_bias_table", "transformer.cls_token", "transformer.pos_embed",
                    "transformer.mask_token")


def decays(name: str, param: torch.Tensor) -> bool:
    # A parameter built under deepspeed.zero.Init holds an empty partition; ds_shape is its real shape.
    return len(getattr(param, "ds_shape", param.shape)) >= 2 and name not in NO_DECAY_TENSORS


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups (decay, no_decay) over the trainable parameters: frozen ones get no optimizer state at all. A
    group left empty by freezing is omitted (DeepSpeed's ZeRO optimizers cannot flatten an empty group)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay, "name": "decay"},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0, "name": "no_decay"}]
    return [group for group in groups if group["params"]]


def warmup_steps(warmup: float | int, total: int) -> int:
    """A fraction in [0, 1) of the stage's steps, or a step count."""
    return int(warmup * total) if isinstance(warmup, float) and warmup < 1 else int(warmup)


def lr_at(step: int, total: int, peak: float, warmup: int, end: float = 0.0) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then linear decay to `end` at `total` (the published schedule).

    `step` counts optimizer steps already taken, so the first update uses lr_at(0) = peak / warmup.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    remaining = max(total - warmup, 1)
    return end + (peak - end) * max(total - step, 0) / remaining


@dataclass(frozen=True)
class LrSchedule:
    """A stage's learning rate by step: lr_at's warm-up and linear decay to `end` at `total`. A resume that changes
    the stage's steps re-plans it (replanned): the decay then runs straight from (from_step, from_lr) to `end` at
    the new total, so the rate does not jump at the resumed step."""

    peak: float
    warmup: int
    end: float
    total: int
    from_step: int = 0
    from_lr: float | None = None
    """The rate at from_step of a re-planned decay (None: never re-planned)."""

    def at(self, step: int) -> float:
        """The rate of the update after `step` steps of the stage (lr_at's convention)."""
        if self.from_lr is None or step < self.warmup:
            return lr_at(step, self.total, self.peak, self.warmup, self.end)
        return self.end + (self.from_lr - self.end) * max(self.total - step, 0) / max(self.total - self.from_step, 1)

    def replanned(self, step: int, total: int) -> LrSchedule:
        """This schedule continued from `step` to a new `total` (a warm-up in progress finishes first)."""
        pivot = max(step, self.warmup)
        return replace(self, total=total, from_step=pivot, from_lr=self.at(pivot))
