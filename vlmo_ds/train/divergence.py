"""The divergence guard: a step whose gradient norm is not finite changes nothing, a run whose loss or gradient norm
stays non-finite stops with one line, and no checkpoint or stage record holds non-finite weights.

Skipping. DeepSpeed's optimizer wrappers (bf16 at ZeRO 0, ZeRO 1-3) check the gradients for inf / NaN before their step
and skip it as an "overflow" (their loss scaler's path: vlmo_ds runs no fp16, so every overflow is a non-finite
gradient), and report the gradient norm as inf. At ZeRO 0 in fp32 DeepSpeed steps the torch AdamW as it is, with no
such check: build_engine makes it fused (steps_unwrapped) and skip_if_not_finite hands it `found_inf`, the flag with
which torch's GradScaler makes a fused optimizer skip. Parameters, moments and step count then stay as they were,
decided on the device: no host read (DeepSpeed's wrappers read their overflow flag on the host, as they always did).
The skip follows the global gradient norm, the same on every rank, so replicas stay equal; a rank's non-finite loss
reaches it through that rank's gradients.

Counting. The host reads each step's loss (the mean over ranks) and gradient norm when the stage loop flushes its
metric lines (vlmo_ds.train.scalars: once per log interval and before every checkpoint), so the count costs no read of
its own. A step is bad when either is not finite; train.max_bad_steps bad steps in a row stop the run at that flush
with DivergedError (python -m vlmo_ds.train exits EXIT_DIVERGED), so with log_every > 1 up to log_every - 1 more
(skipped) steps run first. Every rank reads the same all-reduced values and stops after the same step.

Checkpoints. No checkpoint is written after a bad step (its weights are the last good step's, and a save would rotate
an older one out). Before every save the weights themselves are checked, one pass and one MAX all-reduce (an update
from a finite gradient can still overflow them): non-finite weights stop the run at once. So the newest checkpoint is
always finite and keep_last, which keeps the newest, never deletes it; the stage's last step always saves, so its
record (the last finite step's losses) is only written over finite weights.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlmo_ds.train import checkpoint
from vlmo_ds.train.scalars import StepLine

log = logging.getLogger(__name__)

EXIT_DIVERGED = 65
"""Exit status of a run stopped by the divergence guard: sysexits' EX_DATAERR. Not a status to requeue on: the same
command would diverge again; lower the learning rate (or lengthen the warm-up) first."""


class DivergedError(RuntimeError):
    """The run diverged (one line: the bad steps, the newest finite checkpoint, what to do)."""


def steps_unwrapped(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed steps the torch optimizer as it is (ZeRO 0 in fp32), with no check of its own for
    non-finite gradients: the optimizer must then be fused to skip on skip_if_not_finite's flag."""
    low_precision = any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "fp16"))
    return ds_config.get("zero_optimization", {}).get("stage", 0) == 0 and not low_precision


def skip_if_not_finite(engine, grad_norm: torch.Tensor | None) -> None:
    """At the accumulation boundary, before engine.step(): a fused torch optimizer (ZeRO 0 in fp32) skips its update
    when `grad_norm` (this step's global gradient norm, a device tensor) is not finite. Nothing for DeepSpeed's own
    wrappers, which check the gradients themselves."""
    optimizer = engine.optimizer
    if isinstance(optimizer, torch.optim.Optimizer) and optimizer.defaults.get("fused"):
        optimizer.found_inf = None if grad_norm is None else torch.isfinite(grad_norm).logical_not().float()


def weights_finite(engine, device: torch.device) -> bool:
    """Whether every parameter on every rank (its ZeRO-3 partition) is finite. Collective over the default group:
    every rank calls it at the same point; one read on the host."""
    flags = [torch.isfinite(getattr(p, "ds_tensor", p).detach()).all().to(device) for p in engine.module.parameters()]
    bad = torch.stack(flags).all().logical_not().float() if flags else torch.zeros((), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


class DivergenceGuard:
    """Counts one stage run's bad steps in a row from its flushed metric lines and stops the run after
    `max_bad_steps` of them. Collective in effect: every rank must count the same lines and call may_save at the
    same steps."""

    def __init__(self, max_bad_steps: int, run_dir: str | Path, device: torch.device, rank: int) -> None:
        self.max_bad_steps, self.run_dir, self.device, self.rank = max_bad_steps, Path(run_dir), device, rank
        self.bad_in_a_row = 0
        self._first_bad: int | None = None
        self._tripped: tuple[int, int] | None = None

    def count(self, line: StepLine) -> bool:
        """Count one flushed step; True when its loss and gradient norm are finite."""
        loss = line.losses.get("loss")
        if all(value is None or math.isfinite(value) for value in (loss, line.grad_norm)):
            self.bad_in_a_row, self._first_bad = 0, None
            return True
        self.bad_in_a_row += 1
        self._first_bad = line.step if self._first_bad is None else self._first_bad
        if self.rank == 0:
            skipped = line.grad_norm is not None and not math.isfinite(line.grad_norm)
            log.warning("step %d: loss %s, gradient norm %s: not finite%s (%d in a row, train.max_bad_steps=%d)",
                        line.step, loss, line.grad_norm, ", the update was skipped" if skipped else "",
                        self.bad_in_a_row, self.max_bad_steps)
        if self.bad_in_a_row >= self.max_bad_steps and self._tripped is None:
            self._tripped = (self._first_bad, line.step)
        return False

    def stop_if_diverged(self) -> None:
        """After a flush's lines are counted (and logged): DivergedError once max_bad_steps bad steps came in a row."""
        if self._tripped is not None:
            first, last = self._tripped
            raise DivergedError(f"training diverged: {last - first + 1} steps in a row ({first}-{last}) had a "
                                f"non-finite loss or gradient norm (train.max_bad_steps="
                                f"{self.max_bad_steps}); {self._newest_finite()}")

    def may_save(self, engine, step: int) -> bool:
        """At every save point, on every rank: DivergedError if the weights are not finite; False (no checkpoint)
        right after a bad step."""
        if not weights_finite(engine, self.device):
            raise DivergedError(f"training diverged: the weights are not finite after step {step} (no checkpoint "
                                f"written); {self._newest_finite()}")
        if self.bad_in_a_row:
            if self.rank == 0:
                log.warning("step %d: no checkpoint after a skipped step (the newest stays the last finite one)", step)
            return False
        return True

    def _newest_finite(self) -> str:
        newest = checkpoint.find_resume(self.run_dir, "auto")
        if newest is None:
            return "no checkpoint was written yet: lower optim.lr (or raise optim.warmup) and start again"
        step = int(checkpoint.STEP_DIR.match(newest.name).group(1))
        return (f"the newest finite checkpoint is step {step} ({newest}): lower optim.lr (or raise optim.warmup) "
                f"and run again (train.resume=auto continues from it, train.resume=none starts afresh)")
