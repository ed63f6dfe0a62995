"""Stopping a run early and cleanly: on a signal or at train.deadline_minutes, every rank stops after the same step, a
checkpoint is written, and `python -m vlmo_ds.train` exits with EXIT_STOPPED (train.resume=auto then continues).

Signals, while StopSignals is installed (recorded instead of ending the process):
    SIGUSR1  "time is nearly up": Slurm's `sbatch --signal=B:USR1@120` (forwarded to the tasks by slurm/launch.sh) or
             `scancel -s USR1 JOB`. Like the deadline, it asks for a requeue (requeue_slurm_job).
    SIGTERM  what Slurm (scancel, time limit, preemption), torchrun and the deepspeed launcher send before SIGKILL:
             a checkpoint if there is time, and no requeue: a cancelled job that requeued itself would never end.
             (Slurm's own preemption with PreemptMode=REQUEUE requeues by itself.)

Signals reach the ranks unevenly: `kill -USR1 PID` reaches one rank, and even a signal sent to every task arrives at
different steps on different ranks. The handler therefore only records the signal; the decision is a MAX all-reduce
of [signal, past the deadline], so if any rank saw a signal (or passed the deadline), all ranks stop after the same
step and none is left waiting in a collective of a step the others never start.

Inside a stage (StopPoll) that all-reduce never blocks a step: each rank posts its flags after step s without waiting
(async_op, over a CPU (gloo) group, so no device is involved) and reads the answer after step s + 1. Every rank reads
the same answer after the same step, so a stop is honoured one step after the step at which the flag was posted
(with several ranks; one process decides at once), and the stage's last step decides at once (a blocking vote: the
stage ends there anyway). Between stages the trainer asks agree_to_stop, which blocks.
A process stuck inside a collective runs no Python handler: it needs SIGKILL (Slurm sends it KillWait after SIGTERM).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_STOPPED = 75
"""Exit status of a run that stopped early with a checkpoint and has steps left: sysexits' EX_TEMPFAIL ("try again
later"). Any launcher may simply run the same command again."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass(frozen=True)
class Stop:
    """Why every rank stopped early: the signal some rank received (the largest number if several), else the
    deadline."""

    signal: int | None
    deadline_minutes: float | None

    @property
    def requeue(self) -> bool:
        """SIGUSR1 and the deadline ask to be run again; SIGTERM asks to end."""
        return self.signal != signal.SIGTERM

    def __str__(self) -> str:
        if self.signal is not None:
            return f"signal {signal.Signals(self.signal).name}"
        return f"train.deadline_minutes={self.deadline_minutes:g}"


class StopSignals:
    """While installed (a context manager, entered in the main thread), SIGUSR1 and SIGTERM are recorded in
    `received` instead of ending the process; leaving restores the previous handlers."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        """The first stop signal this process received (its number), None if none."""
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Only record: the handler may interrupt this thread inside logging or a collective's Python wrapper.
        if self.received is None or signum == signal.SIGTERM:
            self.received = signum


def agree_to_stop(signals: StopSignals | None, started: float, deadline_minutes: float | None,
                  device: torch.device) -> Stop | None:
    """Every rank calls this at the same step boundary and gets the same answer: why all ranks stop now, or None to
    go on. `started` is time.monotonic() at the run's start; signals None: only the deadline can stop the run.
    Blocking: for the boundaries between stages (inside a stage, StopPoll)."""
    flags = _flags(signals, started, deadline_minutes).to(device)
    if _distributed():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return _decide(flags.tolist(), deadline_minutes)


def flag_group():
    """The group StopPoll votes over: the default group when it runs on gloo, else (NCCL) a new gloo group of every
    rank, so the flags stay on the CPU. Collective: every rank calls it once, at the same point."""
    if not _distributed() or dist.get_backend() == dist.Backend.GLOO:
        return None
    return dist.new_group(backend=dist.Backend.GLOO)


class StopPoll:
    """The stop decision after each step of a stage, with no blocking collective but at the stage's last step.

    after_step() returns the answer of the vote posted after the previous step (see the module's docstring): with
    several ranks a stop comes one step after the step it was asked at. Every rank builds one per stage and calls
    after_step after every step; no vote is left open once it has returned a stop or been called with last=True.
    """

    def __init__(self, signals: StopSignals | None, started: float, deadline_minutes: float | None,
                 group=None) -> None:
        self.signals, self.started, self.deadline_minutes, self.group = signals, started, deadline_minutes, group
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def after_step(self, last: bool = False) -> Stop | None:
        """Why every rank stops after this step, or None; last: the stage's last step (a blocking vote)."""
        flags = _flags(self.signals, self.started, self.deadline_minutes)
        if not _distributed() or dist.get_world_size(self.group) == 1:
            return _decide(flags.tolist(), self.deadline_minutes)
        earlier = self._collect()
        if last:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            return _decide(torch.maximum(flags, earlier).tolist(), self.deadline_minutes)
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flags)
        if _decide(earlier.tolist(), self.deadline_minutes) is None:
            return None
        # stopping: close the vote just posted too (every rank did post it), so a later SIGTERM still names the stop
        return _decide(torch.maximum(earlier, self._collect()).tolist(), self.deadline_minutes)

    def _collect(self) -> torch.Tensor:
        """The answer of the open vote (no signal, not late when none is open)."""
        if self._pending is None:
            return torch.zeros(2)
        work, flags = self._pending
        self._pending = None
        work.wait()
        return flags


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _flags(signals: StopSignals | None, started: float, deadline_minutes: float | None) -> torch.Tensor:
    """[signal number or 0, past the deadline] of this rank, on the CPU."""
    received = signals.received if signals is not None else None
    late = deadline_minutes is not None and time.monotonic() - started > deadline_minutes * 60
    return torch.tensor([float(received or 0), float(late)])


def _decide(flags: list[float], deadline_minutes: float | None) -> Stop | None:
    signum, late = (int(value) for value in flags)
    if signum or late:
        return Stop(signum or None, deadline_minutes)
    return None


def requeue_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """Rank 0, once the stop's checkpoint is complete and before any rank exits: `scontrol requeue $SLURM_JOB_ID`,
    only when VLMO_REQUEUE=1 (slurm/launch.sh sets it) in a Slurm job. True when Slurm accepted; a refusal (a job
    submitted with --no-requeue, an interactive allocation) is logged and the run just ends with EXIT_STOPPED.

    Rank 0 asks rather than the batch script after srun returns: srun --kill-on-bad-exit=1 ends the step as soon as
    one task exits non-zero, so srun reports the terminated tasks (143), not EXIT_STOPPED."""
    environ = os.environ if environ is None else environ
    job = environ.get("SLURM_JOB_ID", "").strip()
    if environ.get("VLMO_REQUEUE", "").strip() != "1" or not job:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue Slurm job %s (%s): submit the same job again to continue", job, err)
        return False
    if done.returncode != 0:
        log.warning("Slurm refused to requeue job %s (%s): submit the same job again to continue", job,
                    (done.stderr or done.stdout).strip())
        return False
    log.warning("requeued Slurm job %s: when it starts again it continues from the checkpoint", job)
    return True
