"""Stopping early without Slurm: stop signals are recorded, not fatal; the ranks' stop decision is one agreed answer
(a signal on one rank stops both ranks after the same step, with a checkpoint; inside a stage the vote of step s is
read after step s + 1, so no step waits for it); the deadline does the same; the CLI exits with status 75 and the
same command then finishes with the uninterrupted run's losses; the Slurm requeue is asked for only when the launch
helper allows it."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time

import pytest
import torch

from distributed import run_ranks
from train_cli import ENV, losses, recipe_args, train_command
from vlmo_ds.train.preemption import EXIT_STOPPED, Stop, StopPoll, StopSignals, agree_to_stop, requeue_slurm_job

CPU = torch.device("cpu")
STEPS = 8


def test_stop_signals_are_recorded_then_the_old_handlers_return():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    with StopSignals() as signals:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM wins: it asks to end, not to come back
        assert signals.received == signal.SIGTERM
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_one_process_decides_from_signal_and_deadline():
    now = time.monotonic()
    with StopSignals() as signals:
        assert agree_to_stop(signals, now, None, CPU) is None
        assert agree_to_stop(signals, now, 5.0, CPU) is None
        late = agree_to_stop(signals, now - 61, 1.0, CPU)
        assert late == Stop(None, 1.0) and late.requeue and str(late) == "train.deadline_minutes=1"
        os.kill(os.getpid(), signal.SIGUSR1)
        usr1 = agree_to_stop(signals, now, None, CPU)
        assert usr1 == Stop(signal.SIGUSR1, None) and usr1.requeue and str(usr1) == "signal SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        term = agree_to_stop(signals, now - 61, 1.0, CPU)  # a signal names the stop even past the deadline
        assert term == Stop(signal.SIGTERM, 1.0) and not term.requeue and str(term) == "signal SIGTERM"
    assert agree_to_stop(None, now, None, CPU) is None


POLL_CASES = [({}, 4), ({2: signal.SIGUSR1}, 6), ({2: signal.SIGUSR1, 3: signal.SIGTERM}, 6),
              ({5: signal.SIGUSR1}, 5)]
"""(signal rank 1 records after step s, steps of the stage)."""


def _poll_ranks(rank: int, world: int) -> list[tuple]:
    """Per case: (the step after which the ranks stop, why, whether the poll left a vote open)."""
    found = []
    for signal_after, steps in POLL_CASES:
        signals = StopSignals()  # not installed: the flag is set as the handler would
        poll = StopPoll(signals, time.monotonic(), None)
        for step in range(1, steps + 1):
            if rank == 1 and step in signal_after:
                signals.received = signal_after[step]
            stop = poll.after_step(last=step == steps)
            if stop is not None or step == steps:
                found.append((step, stop, poll._pending is not None))
                break
    return found


def test_the_per_step_vote_is_read_one_step_late_on_every_rank():
    ranks = run_ranks(_poll_ranks, 2)
    assert ranks[0] == ranks[1]
    assert ranks[0] == [(4, None, False),
                        (3, Stop(signal.SIGUSR1, None), False),  # posted after step 2, read after step 3
                        (3, Stop(signal.SIGTERM, None), False),  # the vote of step 3 is closed with it: SIGTERM wins
                        (5, Stop(signal.SIGUSR1, None), False)]  # the stage's last step votes at once
    with StopSignals() as signals:  # one process: nothing to agree on, so no delay
        poll = StopPoll(signals, time.monotonic(), None)
        assert poll.after_step() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert poll.after_step() == Stop(signal.SIGUSR1, None)
    assert StopPoll(None, time.monotonic() - 61, 1.0).after_step() == Stop(None, 1.0)


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` first on PATH that records its arguments; exits with $FAKE_STATUS."""
    calls = tmp_path / "calls"
    tool = tmp_path / "bin" / "scontrol"
    tool.parent.mkdir()
    tool.write_text(f'#!/bin/bash\necho "$@" >> {calls}\n[[ $FAKE_STATUS == 0 ]] || echo "Job is not requeueable" >&2\n'
                    'exit "$FAKE_STATUS"\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_STATUS", "0")
    return calls


def test_requeue_only_when_the_launch_helper_allows_it(fake_scontrol, monkeypatch, caplog):
    assert not requeue_slurm_job({"SLURM_JOB_ID": "4242"})  # VLMO_REQUEUE unset: not started by slurm/
    assert not requeue_slurm_job({"VLMO_REQUEUE": "0", "SLURM_JOB_ID": "4242"})
    assert not requeue_slurm_job({"VLMO_REQUEUE": "1"})  # not in a Slurm job
    assert not fake_scontrol.exists()
    assert requeue_slurm_job({"VLMO_REQUEUE": "1", "SLURM_JOB_ID": "4242"})
    assert fake_scontrol.read_text() == "requeue 4242\n"
    monkeypatch.setenv("FAKE_STATUS", "1")
    with caplog.at_level(logging.WARNING, "vlmo_ds.train.preemption"):
        assert not requeue_slurm_job({"VLMO_REQUEUE": "1", "SLURM_JOB_ID": "7"})
    assert "Slurm refused to requeue job 7 (Job is not requeueable)" in caplog.text


def test_requeue_without_scontrol_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING, "vlmo_ds.train.preemption"):
        assert not requeue_slurm_job({"VLMO_REQUEUE": "1", "SLURM_JOB_ID": "7"})
    assert "could not requeue Slurm job 7" in caplog.text


def _signal_one_rank(rank: int, world: int, args: list[str], signal_at: int) -> dict:
    """Train with stop signals installed; rank 1 alone sends itself SIGUSR1 just before its signal_at-th decision
    (after step signal_at)."""
    from vlmo_ds.config import load_config
    from vlmo_ds.parallel.launch import DistEnv
    from vlmo_ds.train import stage_loop
    from vlmo_ds.train.trainer import train

    cfg = load_config(args[0], args[1:], world_size=world)
    env = DistEnv(rank, world, rank, world, 0, "127.0.0.1", 0, "torchrun")  # the process group is already up
    decide, calls = stage_loop.StopPoll.after_step, []

    def signal_then_decide(poll, *decision_args, **decision_kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return decide(poll, *decision_args, **decision_kwargs)

    stage_loop.StopPoll.after_step = signal_then_decide
    with StopSignals() as signals:
        result = train(cfg, env, signals)
    return {"stopped": result.stopped, "step": result.step, "received": signals.received, "decisions": len(calls)}


@pytest.mark.slow
def test_signal_on_one_rank_stops_both_after_the_same_step(run_data, tmp_path):
    run_dir = tmp_path / "run"
    args = recipe_args(run_data, run_dir, STEPS, 4, "train.global_batch=8")
    ranks = run_ranks(_signal_one_rank, 2, args, 2, use_deepspeed=True)  # read after step 3 (StopPoll)
    assert [r["received"] for r in ranks] == [None, signal.SIGUSR1]
    for r in ranks:
        assert (r["stopped"], r["step"], r["decisions"]) == (Stop(signal.SIGUSR1, None), 3, 3)
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_00000003"  # ckpt_every=2: this one is the stop's
    trainer = json.loads((root / "step_00000003" / "trainer.json").read_text())
    assert (trainer["step"], trainer["stage_step"]) == (3, 3)
    assert {p.name for p in (root / "step_00000003").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
    for rank in (0, 1):
        recorded = [json.loads(line)["step"] for line in (run_dir / f"samples_rank{rank}.jsonl").open()]
        assert recorded == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] == "signal SIGUSR1"
    assert not (run_dir / "stages" / "image_text" / "stage.json").exists()


def test_deadline_stops_with_a_checkpoint_and_status_75(run_data, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(train_command(*recipe_args(run_data, run_dir, STEPS, 4, "train.deadline_minutes=1e-6")),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_STOPPED, done.stderr[-3000:]
    assert "train.deadline_minutes=1e-06: every rank stopped after step 1 with a checkpoint" in done.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000001"
    assert sorted(losses(run_dir)) == [1]


@pytest.mark.slow
def test_cli_sigusr1_exits_75_and_the_same_command_finishes_exactly(run_data, tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    subprocess.run(train_command(*recipe_args(run_data, whole, STEPS)), env=ENV, check=True, capture_output=True)
    command = train_command(*recipe_args(run_data, stopped, STEPS))
    log = tmp_path / "stopped.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (stopped / "metrics.jsonl").exists() and max(losses(stopped), default=0) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == EXIT_STOPPED
    at = max(losses(stopped))
    assert 2 <= at < STEPS, "the run was not stopped mid-way"
    assert f"signal SIGUSR1: every rank stopped after step {at} with a checkpoint" in log.read_text()
    assert (stopped / "checkpoints" / "latest").read_text() == f"step_{at:08d}"
    again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed at step {at}" in again.stderr
    want, got = losses(whole), losses(stopped)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
