"""Bounded hangs: train.collective_timeout_minutes is checked; a rank with no progress is named (a silent one first)
and its process ends with status 75; end to end, a 2-rank gloo run whose rank 1 is SIGSTOPped mid-training ends on
rank 0 within the timeout + 60 s with one line naming rank 1; under a real Slurm cluster, a SIGSTOPped rank 0 makes
rank 1 requeue the job, which resumes and finishes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)
from test_slurm import CPU_JOB, SLURM, job_env
from train_cli import ENV, losses, recipe_args, train_command
from vlmo_ds.config import ConfigError, load_config
from vlmo_ds.parallel.env_readers import free_port
from vlmo_ds.train.preemption import EXIT_STOPPED
from vlmo_ds.train.run_lock import LOCK_FILE
from vlmo_ds.train.watchdog import HEARTBEAT_DIR, hang_line, read_heartbeat


def test_the_timeout_is_a_checked_recipe_key(run_data, tmp_path):
    args = recipe_args(run_data, tmp_path, 2)
    assert load_config(args[0], args[1:] + ["train.collective_timeout_minutes=0.5"]).train.collective_timeout_minutes \
        == 0.5
    with pytest.raises(ConfigError, match="train.collective_timeout_minutes: must be > 0"):
        load_config(args[0], args[1:] + ["train.collective_timeout_minutes=0"])


def beat(rank: int, step: int, phase: str, idle: float, silent: float = 0.0) -> dict:
    now = time.time()
    return {"rank": rank, "host": "node1", "pid": 100 + rank, "step": step, "phase": phase, "since": now - idle,
            "watched": True, "beat": now - silent}


def test_the_line_names_a_silent_rank_first_else_the_longest_waiting():
    peers = {0: beat(0, 7, "backward", 40), 1: beat(1, 7, "data", 45, silent=44), 2: beat(2, 7, "backward", 41)}
    line = hang_line(peers, 0, {1}, 30)
    assert line.startswith("rank 1 (host node1, pid 101) made no progress for 45 s at step 7 (data) and its process "
                           "has not answered for 44 s (stopped or gone); rank 0 waited 40 s at step 7 (backward): "
                           "past train.collective_timeout_minutes=0.5, exiting with status 75"), line
    assert hang_line({**peers, 1: beat(1, 7, "data", 39)}, 0, set(), 30).startswith("rank 2 (host node1, pid 102)")
    assert hang_line({0: beat(0, 3, "step", 40), 1: None}, 0, {1}, 30).startswith("rank 1 wrote no heartbeat")


def test_a_rank_without_progress_exits_75_naming_itself(tmp_path):
    script = ("import time\nfrom vlmo_ds.train.watchdog import Watchdog\n"
              f"with Watchdog({str(tmp_path)!r}, 0, 1, 0.02) as progress:\n"
              "    progress.mark(3, 'forward')\n    time.sleep(60)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "VLMO_REQUEUE"})
    assert done.returncode == EXIT_STOPPED and time.monotonic() - started < 10, done.stderr
    assert done.stderr.startswith("vlmo_ds.train: rank 0 (host ") and "at step 3 (forward)" in done.stderr
    assert read_heartbeat(tmp_path / HEARTBEAT_DIR, 0)["phase"] == "forward"


TIMEOUT_MINUTES = 0.5


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_the_timeout(run_data, tmp_path):
    run_dir = tmp_path / "run"
    args = recipe_args(run_data, run_dir, 400, 4, "train.global_batch=8", "train.ckpt_every=1000",
                       "train.record_samples=false", f"train.collective_timeout_minutes={TIMEOUT_MINUTES}")
    port, ranks, logs = free_port(), [], []
    for rank in (0, 1):
        env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", GROUP_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        logs.append(tmp_path / f"rank{rank}.log")
        with logs[-1].open("w") as out:
            ranks.append(subprocess.Popen(train_command(*args), env=env, stdout=subprocess.DEVNULL, stderr=out))
    try:
        deadline = time.monotonic() + 300
        while True:  # rank 1 is inside the stage's steps
            found = read_heartbeat(run_dir / HEARTBEAT_DIR, 1)
            if found and found["watched"] and found["step"] >= 3:
                break
            assert all(p.poll() is None for p in ranks) and time.monotonic() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        status = ranks[0].wait(timeout=TIMEOUT_MINUTES * 60 + 60)
        took = time.monotonic() - stopped
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    said = [line for line in logs[0].read_text().splitlines() if line.startswith("vlmo_ds.train:")]
    assert status == EXIT_STOPPED and len(said) == 1, logs[0].read_text()[-3000:]
    assert said[0].startswith("vlmo_ds.train: rank 1 (host ") and "(stopped or gone)" in said[0], said[0]
    assert "rank 0 waited" in said[0] and took < TIMEOUT_MINUTES * 60 + 60
    assert json.loads((run_dir / HEARTBEAT_DIR / "rank_0.json").read_text())["watched"]


@pytest.mark.slow
def test_under_slurm_a_stopped_rank_0_requeues_and_the_job_finishes(slurm_cluster, run_data, tmp_path):  # noqa: F811
    cluster, run_dir, log = slurm_cluster, tmp_path / "run", tmp_path / "job.log"
    steps = 100
    args = recipe_args(run_data, run_dir, steps, 4, "train.global_batch=8", "train.ckpt_every=20",
                       "train.record_samples=false", f"train.collective_timeout_minutes={TIMEOUT_MINUTES}")
    job = cluster.sbatch(*CPU_JOB, "--ntasks-per-node=2", f"--output={log}", str(SLURM / "pretrain.sbatch"), *args,
                         env=job_env(cluster))
    deadline = time.monotonic() + 240
    while True:  # rank 0, which holds the run folder's lock, is inside the stage's steps
        found = read_heartbeat(run_dir / HEARTBEAT_DIR, 0)
        if found and found["watched"] and found["step"] >= 3:
            break
        running = cluster.job(job).get("JobState") in ("PENDING", "RUNNING")
        assert running and time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else cluster.job(job)
        time.sleep(0.1)
    os.kill(found["pid"], signal.SIGSTOP)
    info = cluster.wait(job)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
    named = re.findall(r"vlmo_ds\.train: rank (\d) \(host \S+, pid (\d+)\) made no progress.*\(stopped or gone\)", text)
    assert named and set(named) == {("0", str(found["pid"]))}, text[-4000:]  # rank 0 too, once Slurm continued it
    assert text.count(f"requeued Slurm job {job}") == 1 and "refused to requeue" not in text
    assert f"vlmo_ds: job {job} restart 1 " in text  # the run-folder lock let the requeued job in
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
    assert not (run_dir / LOCK_FILE).exists()
