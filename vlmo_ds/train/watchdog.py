"""Bounded hangs: when a rank stops making progress (SIGSTOPped, a stuck file-system read, a wedged GPU), every other
rank exits within train.collective_timeout_minutes with one line naming that rank and what it was doing, instead of
waiting in a collective for torch.distributed's timeout.

The training loop marks its progress on a Progress (step and phase: data, forward, backward, step, checkpoint): a few
attribute stores per micro-step, no collective and no device work. A daemon thread per rank (Watchdog) writes the
rank's progress to RUN_DIR/heartbeats/rank_<r>.json every few seconds and looks at its own progress time. No
collective is needed to find a hang: a rank that waits in a collective for a stuck peer makes no progress either, so
when its own progress is older than the timeout it reads every rank's heartbeat file, names the stuck one (a rank
whose heartbeat stopped: its process is stopped or gone; else the rank whose progress is oldest), and ends the
process (os._exit: the main thread is blocked) with EXIT_STOPPED; under slurm/ (VLMO_REQUEUE=1) the lowest-numbered
responsive rank first requeues the job (the others give it REQUEUE_GRACE_SECONDS), which then resumes from the last
checkpoint and takes its own run-folder lock back (vlmo_ds.train.run_lock).

The heartbeat shows a rank's step and phase as of its last beat: a rank stopped between two beats is named with the
phase it was in up to one interval earlier.

Start-up and evaluations are not watched (Progress.pause): they take their own time; torch.distributed's timeout,
BACKSTOP_MINUTES later than the watchdog's, still bounds them.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from vlmo_ds.train.preemption import EXIT_STOPPED, requeue_slurm_job

HEARTBEAT_DIR = "heartbeats"
BACKSTOP_MINUTES = 1.0
"""torch.distributed's collective timeout is train.collective_timeout_minutes plus this, so that the watchdog, which
names the stuck rank, ends a hang first, and collectives still time out where the watchdog does not look."""

REQUEUE_GRACE_SECONDS = 10.0
"""Under slurm/, the ranks that do not requeue wait this long before exiting, so that the requeuing rank's
`scontrol requeue` is done before srun --kill-on-bad-exit ends the step at the first exit."""


class Progress:
    """What this rank is doing: set by the training loop, read by the watchdog thread."""

    __slots__ = ("step", "phase", "since", "watched")

    def __init__(self) -> None:
        self.step, self.phase, self.since, self.watched = 0, "startup", time.time(), False

    def mark(self, step: int, phase: str) -> None:
        """Global step `step` enters `phase` (data, forward, backward, step, checkpoint); watched from now on."""
        self.step, self.phase, self.since, self.watched = step, phase, time.time(), True

    def pause(self, phase: str) -> None:
        """Enter a phase the watchdog leaves alone (an evaluation, the next stage's start-up)."""
        self.phase, self.since, self.watched = phase, time.time(), False


class Watchdog:
    """While entered, a thread beats this rank's heartbeat file and ends the process when the rank has made no
    progress for `timeout_minutes` (see the module docstring). Entering returns the Progress to mark."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, timeout_minutes: float,
                 before_exit: Callable[[], None] | None = None) -> None:
        self.folder = Path(run_dir) / HEARTBEAT_DIR
        self.rank, self.world_size = rank, world_size
        self.timeout = timeout_minutes * 60
        self.interval = min(30.0, max(1.0, self.timeout / 10))
        """Seconds between heartbeats and between looks at the progress."""
        self.before_exit = before_exit
        self.progress = Progress()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vlmo-watchdog", daemon=True)

    def __enter__(self) -> Progress:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread.start()
        return self.progress

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()

    def _watch(self) -> None:
        woke = time.monotonic()
        while not self._stop.wait(self.interval):
            # a thread that slept far past its interval belonged to a stopped process (SIGSTOP, then SIGCONT from
            # Slurm's kill): this rank is the stuck one, whatever its peers did since
            frozen, woke = time.monotonic() - woke > 3 * self.interval, time.monotonic()
            if not frozen:
                try:
                    self._beat()
                except OSError:  # a file-system hiccup: the next beat tries again
                    pass
            progress = self.progress
            if progress.watched and time.time() - progress.since > self.timeout and not self._stop.is_set():
                self._end(frozen)

    def _beat(self) -> None:
        p = self.progress
        state = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": p.step,
                 "phase": p.phase, "since": p.since, "watched": p.watched, "beat": time.time()}
        temporary = self.folder / f".rank_{self.rank}.json.tmp"
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.folder / f"rank_{self.rank}.json")

    def _end(self, frozen: bool) -> None:
        peers = {rank: read_heartbeat(self.folder, rank) for rank in range(self.world_size)}
        silent = {rank for rank, beat in peers.items() if (rank != self.rank or frozen) and self._silent(beat)}
        print(f"vlmo_ds.train: {hang_line(peers, self.rank, silent, self.timeout)}", file=sys.stderr, flush=True)
        if self.rank == min(set(peers) - silent, default=None):
            requeue_slurm_job()
        elif os.environ.get("VLMO_REQUEUE", "").strip() == "1":
            time.sleep(REQUEUE_GRACE_SECONDS)  # srun --kill-on-bad-exit would end the step before the requeue
        if self.before_exit is not None:
            self.before_exit()
        os._exit(EXIT_STOPPED)

    def _silent(self, beat: dict | None) -> bool:
        """No heartbeat for three intervals: the process is stopped or gone (or it never started this run)."""
        return beat is None or time.time() - beat["beat"] > 3 * self.interval


def read_heartbeat(folder: Path, rank: int) -> dict | None:
    try:
        return json.loads((folder / f"rank_{rank}.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def hang_line(peers: dict[int, dict | None], me: int, silent: set[int], timeout: float) -> str:
    """One line: the stuck rank (a silent one first, else the one whose progress is oldest), what it was doing, and
    what this rank waited in; the fix."""
    now = time.time()
    stuck = min(peers, key=lambda r: (r not in silent, peers[r]["since"] if peers[r] else 0.0, r))
    beat, mine = peers[stuck], peers[me]
    if beat is None:
        what = f"rank {stuck} wrote no heartbeat in this run"
    else:
        what = (f"rank {stuck} (host {beat['host']}, pid {beat['pid']}) made no progress for "
                f"{now - beat['since']:.0f} s at step {beat['step']} ({beat['phase']})")
        if stuck in silent:
            what += f" and its process has not answered for {now - beat['beat']:.0f} s (stopped or gone)"
    waited = "" if stuck == me or mine is None else \
        f"; rank {me} waited {now - mine['since']:.0f} s at step {mine['step']} ({mine['phase']})"
    return (f"{what}{waited}: past train.collective_timeout_minutes={timeout / 60:g}, exiting with status "
            f"{EXIT_STOPPED}; look at that rank's node (a stuck file-system read, a wedged GPU), then run the same "
            "command to resume from the last checkpoint (slurm/ jobs requeue themselves)")
