"""One job per run folder: a live lock refuses a second job with one line naming the holder; a stale lock, a lock of
a process gone from this host and a lock of the same (requeued) Slurm job are taken over; the heartbeat refreshes;
every rank learns rank 0's answer; and end to end, a duplicate training job refuses while the first finishes
untouched."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch.distributed as dist

from distributed import run_ranks
from train_cli import ENV, losses, recipe_args, train_command
from vlmo_ds.train.run_lock import EXIT_BUSY, LOCK_FILE, RunFolderBusy, RunLock, hold_run_folder, read_holder


def holder(host: str = "node7", pid: int = 4242, job: str | None = "100", age: float = 0.0) -> dict:
    return {"host": host, "pid": pid, "job": job, "token": uuid.uuid4().hex, "heartbeat": time.time() - age}


def plant(run_dir, lock: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(lock))


def me(host: str = "node8", job: str | None = "200") -> dict:
    return {"host": host, "pid": os.getpid(), "job": job, "token": uuid.uuid4().hex}


def ended_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_live_lock_refuses_with_one_line_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run", me("node7", "100"))
    first.acquire()
    try:
        with pytest.raises(RunFolderBusy) as refused:
            RunLock(tmp_path / "run", me("node8", "200")).acquire()
        line = str(refused.value)
        assert len(line.splitlines()) == 1
        for part in ("is in use by Slurm job 100", "host node7", f"pid {os.getpid()}", "last heartbeat 0 s ago",
                     "scancel 100", "another run_dir"):
            assert part in line, line
        assert read_holder(tmp_path / "run" / LOCK_FILE)["token"] == first.me["token"]  # left as it was
    finally:
        first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


HERE = socket.gethostname()


@pytest.mark.parametrize("planted, mine, taken", [
    ({"age": 301}, {}, True),  # heartbeat older than STALE_MINUTES: a dead job
    ({"age": 200}, {}, False),
    ({"job": "100"}, {"job": "100"}, True),  # the same Slurm job, requeued
    ({"job": None}, {"job": None}, False),
    ({"host": HERE, "pid": "ended"}, {"host": HERE}, True),  # its process is gone from this host
    ({"host": HERE, "pid": os.getppid()}, {"host": HERE}, False),  # alive on this host
])
def test_takeover_only_of_a_dead_or_own_job(tmp_path, planted, mine, taken):
    planted = holder(**{**planted, "pid": ended_pid()} if planted.get("pid") == "ended" else planted)
    mine = me(**mine)
    plant(tmp_path, planted)
    lock = RunLock(tmp_path, mine)
    if taken:
        lock.acquire()
        assert read_holder(tmp_path / LOCK_FILE)["token"] == mine["token"]
        lock.release()
        assert list(tmp_path.iterdir()) == []  # nothing left beside: the old lock was moved aside and removed
    else:
        with pytest.raises(RunFolderBusy):
            lock.acquire()
        assert read_holder(tmp_path / LOCK_FILE) == planted


def test_the_heartbeat_refreshes_and_a_taken_lock_is_not_removed(tmp_path):
    lock = RunLock(tmp_path, heartbeat_seconds=0.05)
    lock.acquire()
    first = read_holder(tmp_path / LOCK_FILE)["heartbeat"]
    time.sleep(0.3)
    assert read_holder(tmp_path / LOCK_FILE)["heartbeat"] > first
    other = holder()
    plant(tmp_path, other)  # another job took it over (this one looked dead)
    lock.release()
    assert read_holder(tmp_path / LOCK_FILE) == other


def _hold(rank: int, world: int, run_dir: str) -> dict:
    try:
        with hold_run_folder(run_dir, rank) as lock:
            held = {"lock": lock is not None, "file": os.path.exists(os.path.join(run_dir, LOCK_FILE))}
            dist.barrier()  # rank 0 releases once every rank has looked
            return held
    except RunFolderBusy as err:
        return {"refused": str(err)}


def test_every_rank_learns_rank_0s_answer(tmp_path):
    free = run_ranks(_hold, 2, str(tmp_path / "free"))
    assert free == [{"lock": True, "file": True}, {"lock": False, "file": True}]
    assert not (tmp_path / "free" / LOCK_FILE).exists()  # released at the end
    plant(tmp_path / "busy", holder())
    busy = run_ranks(_hold, 2, str(tmp_path / "busy"))
    assert busy[0] == busy[1] and "is in use by Slurm job 100" in busy[0]["refused"]


@pytest.mark.slow
def test_a_duplicate_job_refuses_while_the_first_finishes_untouched(run_data, tmp_path):
    steps, run_dir = 6, tmp_path / "run"
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}
    command = train_command(*recipe_args(run_data, run_dir, steps))
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 300
        while not (max(losses(run_dir), default=0) >= 1 if (run_dir / "metrics.jsonl").exists() else False):
            assert first.poll() is None and time.monotonic() < deadline, "the first job did not start training"
            time.sleep(0.1)
        first.send_signal(signal.SIGSTOP)  # paused mid-run while the duplicate starts: an overlap for sure
        try:
            second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == EXIT_BUSY, second.stderr[-3000:]
        said = [line for line in second.stderr.splitlines() if line.startswith("vlmo_ds.train:")]
        assert len(said) == 1 and f"a job outside Slurm (host {socket.gethostname()}, pid {first.pid}," in said[0]
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
    recorded = [json.loads(line)["step"] for line in (run_dir / "samples_rank0.jsonl").open()]
    assert recorded == list(range(1, steps + 1))  # the duplicate trained no step
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"
    assert (run_dir / "stages" / "image_text" / "stage.json").is_file()
    assert not (run_dir / LOCK_FILE).exists()
