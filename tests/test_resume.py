"""Resume is exact: a run killed with SIGKILL and resumed with resume=auto continues with the same losses and the same
sample keys as the uninterrupted run; a SIGKILL inside a save leaves the previous checkpoint as the one resumed."""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train_cli import ENV, losses, recipe_args, train_command
from vlmo_ds.train.checkpoint import rng_state, set_rng_state

STEPS = 8


def command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return train_command(*recipe_args(data, run_dir, STEPS, 4, *extra))


def keys(run_dir: Path) -> dict[int, list[str]]:
    lines = (run_dir / "samples_rank0.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}  # a resumed step overwrites the killed run's


@pytest.fixture(scope="module")
def uninterrupted(run_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    subprocess.run(command(run_data, run_dir), check=True, env=ENV, capture_output=True)
    return run_dir


@pytest.mark.slow
def test_sigkill_then_resume_continues_exactly(run_data, uninterrupted, tmp_path):
    data = run_data
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(command(data, run_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once step 5 is logged (checkpoint at 4 exists)
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(run_dir))
    assert 5 <= killed_at < STEPS, "the run was not stopped mid-way"
    subprocess.run(command(data, run_dir, "train.resume=auto"), check=True, env=ENV, capture_output=True)
    want, got = losses(uninterrupted), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert keys(run_dir) == keys(uninterrupted)


KILL_IN_SAVE = """
import os, signal, sys
import vlmo_ds.train.checkpoint as checkpoint
original = checkpoint.rng_state
def dying_rng_state():  # called inside save(), after DeepSpeed wrote its files into the .tmp folder
    if "step_00000006.tmp" in str(os.listdir(checkpoint.root_of(sys.argv[-1].split("=", 1)[1]))):
        os.kill(os.getpid(), signal.SIGKILL)
    return original()
checkpoint.rng_state = dying_rng_state
from vlmo_ds.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_the_previous_checkpoint(run_data, uninterrupted, tmp_path):
    data = run_data
    run_dir = tmp_path / "dies_in_save"
    script = tmp_path / "dies_in_save.py"
    script.write_text(KILL_IN_SAVE)
    args = command(data, run_dir)[3:] + [f"run_dir={run_dir}"]
    proc = subprocess.run([sys.executable, str(script), *args], env=ENV, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    root = run_dir / "checkpoints"
    assert (root / "step_00000006.tmp").is_dir() and (root / "latest").read_text() == "step_00000004"
    subprocess.run(command(data, run_dir, "train.resume=auto"), check=True, env=ENV, capture_output=True)
    assert not (root / "step_00000006.tmp").exists()
    assert losses(run_dir) == pytest.approx(losses(uninterrupted), rel=1e-6)


def test_rng_states_round_trip():
    np.random.rand(3), random.random(), torch.rand(3)
    state = rng_state()
    first = (np.random.rand(5).tolist(), np.random.randn(), random.random(), torch.rand(4).tolist())
    np.random.rand(7), random.random(), torch.rand(2)
    set_rng_state(state)
    assert (np.random.rand(5).tolist(), np.random.randn(), random.random(), torch.rand(4).tolist()) == first


def test_resume_into_another_model_is_one_line(run_data, tmp_path):
    # a run stopped after step 1 (deadline) with 16 px patches (17 absolute positions); 8 px patches cannot resume it
    run_dir = tmp_path / "run"
    stopped = subprocess.run(command(run_data, run_dir, "train.deadline_minutes=1e-6"), env=ENV, capture_output=True)
    assert stopped.returncode == 75 and (run_dir / "checkpoints" / "step_00000001").is_dir()
    done = subprocess.run(command(run_data, run_dir, "model.patch_size=8"), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("vlmo_ds.train:")]
    assert len(errors) == 1 and "patch_size 16 (this run 8)" in errors[0] and "init_from" in errors[0], errors
    assert "Traceback" not in done.stderr


def test_latest_pointing_outside_the_run_folder_is_ignored(tmp_path):
    from vlmo_ds.train.checkpoint import find_resume

    root = tmp_path / "run" / "checkpoints"
    for name in ("step_00000002", "step_00000004"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer.json").write_text("{}")
    (tmp_path / "step_00000009").mkdir()
    (tmp_path / "step_00000009" / "trainer.json").write_text("{}")
    (root / "latest").write_text("../../step_00000009")
    assert find_resume(tmp_path / "run", "auto") == root / "step_00000004"
    (root / "latest").write_text("step_00000002")
    assert find_resume(tmp_path / "run", "auto") == root / "step_00000004"  # the newest complete one wins
