"""Each optimizer step's losses, accuracies and gradient norm, kept on the device until the log interval.

Reading a device value on the host (float, .item(), .tolist()) makes the host wait for every kernel queued before
it: one such read per step keeps the host from running ahead of the GPU. The stage loop therefore adds each step's
device scalars here and flushes once per log interval, at checkpoints and at the stage's end: one all-reduce of the
interval's [steps, metrics] block over the ranks and one transfer to the host, then one line per step.
Collective: every rank adds and flushes at the same steps.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StepLine:
    """One step's values on the host."""

    step: int
    losses: dict[str, float]
    """Every loss and accuracy of the step, averaged over all ranks."""
    grad_norm: float | None
    host: dict[str, float]
    """Values the host already held at the step (learning rate, skipped-sample counts)."""
    time: float
    """Unix time at the end of the step."""

    def scalars(self) -> dict[str, float]:
        """The step's metric line: train/<loss>, opt/grad_norm and the host values."""
        out = {f"train/{name}": value for name, value in self.losses.items()}
        if self.grad_norm is not None:
            out["opt/grad_norm"] = self.grad_norm
        return out | self.host


class StepScalars:
    """Steps added since the last flush: device scalars, not yet read by the host. `device`: where the all-reduce
    runs (the rank's device)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._steps: list[tuple[int, dict[str, torch.Tensor], torch.Tensor | float | None, dict[str, float],
                                float]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, losses: Mapping[str, torch.Tensor | float], grad_norm: torch.Tensor | float | None,
            host: Mapping[str, float]) -> None:
        """Keep step `step`'s losses (0-dim device tensors; floats, which some caller already read, are copied to
        the device) and gradient norm (a tensor or a float; this rank's, not averaged: every rank computes the same
        global norm) without reading them. The clone keeps a norm that its owner may overwrite in place."""
        values = {name: value.detach().float().reshape(()) if isinstance(value, torch.Tensor)
                  else torch.tensor(float(value), device=self.device) for name, value in losses.items()}
        norm = grad_norm.detach().float().reshape(()).clone() if isinstance(grad_norm, torch.Tensor) else grad_norm
        self._steps.append((step, values, norm, dict(host), time.time()))

    def flush(self) -> list[StepLine]:
        """The kept steps on the host, oldest first (then forgotten): one all-reduce, one device-to-host copy."""
        if not self._steps:
            return []
        names = sorted(self._steps[0][1])
        assert all(sorted(values) == names for _, values, _, _, _ in self._steps), "steps differ in their losses"
        losses = torch.stack([torch.stack([values[n] for n in names]) for _, values, _, _, _ in self._steps])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(losses)
            losses /= dist.get_world_size()
        norms = [norm.to(losses.device) for _, _, norm, _, _ in self._steps if isinstance(norm, torch.Tensor)]
        values = torch.cat([losses.reshape(-1), *(n.reshape(1) for n in norms)]).tolist()  # the interval's one read
        means, read_norms = values[: losses.numel()], iter(values[losses.numel():])
        lines = []
        for i, (step, _, norm, host, wall) in enumerate(self._steps):
            row = dict(zip(names, means[i * len(names): (i + 1) * len(names)]))
            norm = next(read_norms) if isinstance(norm, torch.Tensor) else norm
            lines.append(StepLine(step, row, norm, host, wall))
        self._steps.clear()
        return lines

