"""A stage's trainable set applied to a model: requires_grad per parameter group (vlmo_ds.config.groups).

Frozen means frozen all the way down: requires_grad=False, so autograd computes no weight gradient for it; and the
optimizer never sees it (vlmo_ds.train.optim.param_groups keeps trainable parameters only), so it has no AdamW
state, gets no weight decay, and its value after the stage is bit-identical to its value before. Under DeepSpeed
(0.19.8, read from its source): ZeRO 1-2 flatten and partition only the parameters of the optimizer's groups, so a
frozen parameter holds no fp32 master copy, no gradient partition and no optimizer state on any rank and is kept
whole in the module; ZeRO 3 also leaves it out of the optimizer's partitions, and still shards its 16-bit storage
across the data-parallel ranks like every module parameter (which saves that memory too).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from vlmo_ds.config.groups import expand, group_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainableReport:
    """What apply_trainable left trainable."""

    groups: tuple[str, ...]
    """The leaf groups that train (sorted)."""
    trainable: int
    """Trainable parameter count."""
    frozen: int
    """Frozen parameter count."""


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Group name -> the names of the model's parameters in it; a ValueError names a parameter no group claims."""
    out: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        group = group_of(name)
        if group is None:
            raise ValueError(f"parameter {name} belongs to no trainable group; add it to vlmo_ds.config.groups so "
                             "that stages can freeze or train it")
        out.setdefault(group, []).append(name)
    return out


def apply_trainable(model: nn.Module, trainable: str | tuple[str, ...]) -> TrainableReport:
    """Set requires_grad: True for the parameters of `trainable` ("all" or group names), False for the rest.

    A group the model lacks (relative_position with absolute positions) trains nothing; the recipe validation
    refuses the groups that cannot be meant (vlmo_ds.config.validate).
    """
    groups = parameter_groups(model)
    wanted = frozenset(groups) if trainable == "all" else expand(trainable) & set(groups)
    if not wanted:
        raise ValueError(f"the trainable groups {', '.join(trainable)} name no parameter of this model; name a "
                         "group that trains")
    counts = {True: 0, False: 0}
    for name, param in model.named_parameters():
        learns = group_of(name) in wanted
        param.requires_grad_(learns)
        counts[learns] += getattr(param, "ds_numel", param.numel())  # ZeRO-3 partitions: the full size
    return TrainableReport(tuple(sorted(wanted)), counts[True], counts[False])
