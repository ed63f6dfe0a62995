"""Resume is exact: a run killed with SIGKILL and resumed with resume=auto continues with the same losses and the same
sample keys as the uninterrupted run; a SIGKILL inside a save leaves the previous checkpoint as the one resumed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmo_ds.data.synthetic import SyntheticConfig, write_synthetic
from vlmo_ds.data.text_corpus import expand_inputs, iter_lines
from vlmo_ds.data.tokenizer import train_sentencepiece
from vlmo_ds.train.metrics import read_metrics

STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, SyntheticConfig(shard_size=40).scaled(0.01))
    files = expand_inputs([str(root / "pretrain_pairs")])
    train_sentencepiece(iter_lines(files), root / "tok", vocab_size=120, model_type="bpe")
    return root


def command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlmo_ds.train", "tiny", f"run_dir={run_dir}", f"tokenizer={data / 'tok.model'}",
            f"stages.0.data={data / 'pretrain_pairs'}", "eval.retrieval=null", f"stages.0.steps={STEPS}",
            "train.micro_batch=4", "train.global_batch=4", "train.ckpt_every=2", "train.keep_last=2",
            "train.num_workers=1", "train.record_samples=true", "model.patch_size=16", "model.max_text_len=16",
            *extra]


ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


def keys(run_dir: Path) -> dict[int, list[str]]:
    lines = (run_dir / "samples_rank0.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}  # a resumed step overwrites the killed run's


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    subprocess.run(command(data, run_dir), check=True, env=ENV, capture_output=True)
    return run_dir


@pytest.mark.slow
def test_sigkill_then_resume_continues_exactly(data, uninterrupted, tmp_path):
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
def test_sigkill_during_save_resumes_from_the_previous_checkpoint(data, uninterrupted, tmp_path):
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
