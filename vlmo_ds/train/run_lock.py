"""One job per run folder: rank 0 holds RUN_DIR/run.lock for the whole run, and a second job on the same folder
refuses at start instead of resuming from, and overwriting, the live job's checkpoints.

The lock is a file created with O_CREAT | O_EXCL, which is atomic on local disks and on NFS (v3 and later) and Lustre,
so two jobs starting together cannot both win. It holds the holder's host, pid, Slurm job id and a heartbeat (wall
clock) that a daemon thread of rank 0 refreshes every HEARTBEAT_SECONDS. A lock is taken over when:
  - its heartbeat is older than STALE_MINUTES (a job that died without removing it, on any node);
  - its holder ran on this host and that process is gone (a killed local run restarts at once);
  - it carries this job's SLURM_JOB_ID (a requeued job takes its own lock back at once).
A takeover renames the old file away (rename is atomic: of two jobs taking over together, one gets it) and creates
a new one. Only rank 0 touches the file; the other ranks learn the outcome through one broadcast at start, so a
refusal ends every rank with the same line and none is left waiting in a collective.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import torch.distributed as dist

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 30.0
"""How often the holder refreshes its heartbeat."""
STALE_MINUTES = 5.0
"""A lock whose heartbeat is older than this belongs to a dead job and is taken over (10 missed heartbeats)."""
EXIT_BUSY = 73
"""Exit status of a job refused because another job holds its run folder (sysexits' EX_CANTCREAT)."""


class RunFolderBusy(RuntimeError):
    """Another live job holds the run folder."""


def holder_here(environ: Mapping[str, str] | None = None) -> dict:
    """This process as a lock holder: host, pid, Slurm job id (None outside Slurm), a token naming this hold."""
    environ = os.environ if environ is None else environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": environ.get("SLURM_JOB_ID", "").strip() or None,
            "token": uuid.uuid4().hex}


class RunLock:
    """The lock of one run folder, held from acquire() to release(), with a heartbeat thread in between."""

    def __init__(self, run_dir: str | Path, me: dict | None = None, stale_minutes: float = STALE_MINUTES,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.me = holder_here() if me is None else me
        self.stale_seconds, self.heartbeat_seconds = stale_minutes * 60, heartbeat_seconds
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        """Create the lock or take over a stale one, then start the heartbeat; RunFolderBusy names a live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the file can vanish or be taken over between our looks: look again
            if self._create():
                break
            holder = read_holder(self.path)
            if holder is None:
                continue
            why = self._takeover_reason(holder)
            if why is None:
                raise RunFolderBusy(busy_line(self.path, holder, self.stale_seconds))
            if self._take_over(holder):
                log.warning("took over the run folder's lock %s from %s (%s)", self.path, describe(holder), why)
                break
        else:
            raise RunFolderBusy(f"could not take the lock {self.path}: other jobs keep taking it; make sure only one "
                                "job uses this run folder, or give another run_dir")
        self._beat = threading.Thread(target=self._heartbeat, name="vlmo-run-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        holder = read_holder(self.path)
        if holder is not None and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps({**self.me, "heartbeat": time.time()}))
        return True

    def _takeover_reason(self, holder: dict) -> str | None:
        if self.me["job"] is not None and holder.get("job") == self.me["job"]:
            return f"the same Slurm job {self.me['job']}, requeued"
        if holder.get("host") == self.me["host"] and not _alive(holder.get("pid")):
            return f"process {holder.get('pid')} on this host has ended"
        if heartbeat_age(holder) > self.stale_seconds:
            return f"no heartbeat for {heartbeat_age(holder):.0f} s"
        return None

    def _take_over(self, holder: dict) -> bool:
        """Move the judged lock aside and create ours; False when another job moved or replaced it first."""
        aside = self.path.with_name(f"{LOCK_FILE}.old.{self.me['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_holder(aside)
        if moved is not None and moved.get("token") != holder.get("token"):  # a fresh lock, not the one judged
            try:
                os.link(aside, self.path)  # put it back, unless yet another job created one meanwhile
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            holder = read_holder(self.path)
            if holder is None or holder.get("token") != self.me["token"]:
                log.error("the run folder's lock %s was taken over by %s while this job ran: two jobs may now write "
                          "this run folder; stop one of them", self.path, describe(holder or {}))
                return
            temporary = self.path.with_name(f"{LOCK_FILE}.{self.me['token']}")
            try:
                temporary.write_text(json.dumps({**self.me, "heartbeat": time.time()}))
                os.replace(temporary, self.path)
            except OSError as err:  # a file-system hiccup: the next beat tries again
                log.warning("could not refresh the heartbeat of %s (%s)", self.path, err)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def read_holder(path: Path) -> dict | None:
    """The lock file's holder, None when there is no lock (or a half-written one: it is looked at again)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def heartbeat_age(holder: dict) -> float:
    return time.time() - float(holder.get("heartbeat", 0))


def describe(holder: dict) -> str:
    job = f"Slurm job {holder['job']}" if holder.get("job") else "a job outside Slurm"
    return (f"{job} (host {holder.get('host')}, pid {holder.get('pid')}, last heartbeat "
            f"{heartbeat_age(holder):.0f} s ago)")


def busy_line(path: Path, holder: dict, stale_seconds: float) -> str:
    return (f"run folder {path.parent} is in use by {describe(holder)}: wait for it to end or stop it "
            f"({'scancel ' + holder['job'] if holder.get('job') else 'kill ' + str(holder.get('pid'))}), or give "
            f"another run_dir; a lock whose holder died is taken over once its heartbeat is {stale_seconds / 60:g} "
            f"min old (or delete {path})")


def _alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def hold_run_folder(run_dir: str | Path, rank: int) -> Iterator[RunLock | None]:
    """Every rank enters this once, after the process group starts: rank 0 holds the run folder's lock until the
    block ends (the lock is yielded to rank 0, None to the others). When the folder is busy, every rank raises
    RunFolderBusy with rank 0's line: one broadcast, so no rank is left waiting in a collective."""
    lock, refusal = None, None
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunFolderBusy as err:
            lock, refusal = None, str(err)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise RunFolderBusy(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
