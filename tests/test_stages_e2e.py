"""The tiny three-stage recipe end to end on the synthetic data: frozen parameters untouched, MIM loss falling, held-out
text MLM scored; SIGKILL inside stage 2 and inside stage 3 then resume gives the uninterrupted run's losses without
re-running a finished stage; one job per stage gives them too."""
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from test_stage_recipes import stagewise_args
from train_cli import ENV, losses, train_command
from vlmo_ds.config import load_config
from vlmo_ds.config.groups import expand, group_of
from vlmo_ds.config.schema import STAGE2_TRAINABLE
from vlmo_ds.data.tokenizer import load_tokenizer
from vlmo_ds.model.published import read_state_dict
from vlmo_ds.train.metrics import read_metrics
from vlmo_ds.train.stage_loop import build_model

STEPS = {"image_mim": 60, "text_mlm": 8, "image_text": 8}
STARTS = {"image_mim": 0, "text_mlm": 60, "image_text": 68}
TOTAL = sum(STEPS.values())
TEXT_ONLY = {"text_embeddings", "text_experts", "mlm_head"}


def args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    steps = [f"stages.{name}.steps={n}" for name, n in STEPS.items()]
    return stagewise_args(data, run_dir, *steps, "train.ckpt_every=2", "train.keep_last=2",
                          "train.record_samples=true", "stages.text_mlm.text_len=32", "stages.image_mim.micro_batch=16",
                          "stages.image_mim.global_batch=16", *extra)


def run(data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(*args(data, run_dir, *extra)), env=ENV, capture_output=True, text=True,
                          check=True)


def weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return read_state_dict(run_dir / "stages" / stage / "weights.safetensors")


def keys(run_dir: Path) -> dict[int, list[str]]:
    lines = (run_dir / "samples_rank0.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}


def record_time(run_dir: Path, stage: str) -> float:
    return json.loads((run_dir / "stages" / stage / "stage.json").read_text())["time"]


@pytest.fixture(scope="module")
def uninterrupted(run_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stagewise")
    run(run_data, run_dir)
    return run_dir


@pytest.mark.slow
def test_three_stages_hand_weights_on_and_freeze_what_they_must(run_data, uninterrupted):
    records = read_metrics(uninterrupted / "metrics.jsonl")
    stage_of = {r["step"]: r["stage"] for r in records if "train/loss" in r}
    assert sorted(stage_of) == list(range(1, TOTAL + 1))
    assert [stage_of[STARTS[name] + 1] for name in STEPS] == list(STEPS)
    image, text, pairs = (weights(uninterrupted, name) for name in STEPS)
    # The text stage: every parameter outside its trainable set is bit-identical to its value at the stage's start.
    trainable = expand(STAGE2_TRAINABLE)
    shared = sorted(set(image) & set(text))
    assert "transformer.mask_token" in image and "transformer.mask_token" not in text  # MIM head left behind
    for name in shared:
        same = torch.equal(text[name], image[name])
        assert same != (group_of(name) in trainable), name
    # The image stage: text-only parameters (and the VL experts) still hold their initial values.
    cfg = load_config("tiny", args(run_data, uninterrupted)[1:])
    initial = build_model(cfg, load_tokenizer(cfg.tokenizer).vocab_size, 0).state_dict()
    for name, value in image.items():
        if group_of(name) in TEXT_ONLY | {"vl_experts"}:
            assert torch.equal(value, initial[name]), name
    assert not torch.equal(image["transformer.blocks.0.mlp_imag.fc1.weight"],
                           initial["transformer.blocks.0.mlp_imag.fc1.weight"])
    vl = "transformer.blocks.3.mlp_vl.fc1.weight"
    assert not torch.equal(pairs[vl], text[vl])  # the image-text stage trains the VL expert
    scored = json.loads((uninterrupted / "stages/text_mlm/stage.json").read_text())["text_mlm"]
    assert 0 <= scored["unigram"] < 1 and 0 <= scored["accuracy"] <= 1 and scored["masked"] > 0
    assert any("eval/text_mlm_acc" in r and r["step"] == STARTS["image_text"] for r in records)


@pytest.mark.slow
def test_mim_loss_falls(uninterrupted):
    mim = [r["train/mim"] for r in read_metrics(uninterrupted / "metrics.jsonl") if "train/mim" in r]
    assert len(mim) == STEPS["image_mim"]
    assert sum(mim[-10:]) / 10 < 0.9 * sum(mim[:10]) / 10, mim


def wait_and_kill(proc: subprocess.Popen, run_dir: Path, step: int) -> int:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return max(losses(run_dir))


@pytest.mark.slow
def test_sigkill_inside_stage2_and_stage3_then_resume(run_data, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    command = train_command(*args(run_data, run_dir))
    with open(tmp_path / "first.log", "w") as log:
        killed = wait_and_kill(subprocess.Popen(command, env=ENV, stdout=log, stderr=log), run_dir,
                               STARTS["text_mlm"] + 5)
    assert STARTS["text_mlm"] + 5 <= killed < STARTS["image_text"], "not stopped inside stage 2"
    killed_in_stage2 = killed
    image_mim_done = record_time(run_dir, "image_mim")
    with open(tmp_path / "second.log", "w") as log:
        killed = wait_and_kill(subprocess.Popen(command, env=ENV, stdout=log, stderr=log), run_dir,
                               STARTS["image_text"] + 5)
    assert STARTS["image_text"] + 5 <= killed < TOTAL, "not stopped inside stage 3"
    second = (tmp_path / "second.log").read_text()
    assert "stage 1/3 image_mim" not in second and "stage 2/3 text_mlm" in second
    resumed = int(re.search(r"resumed at step (\d+)", second).group(1))
    # the newest complete checkpoint of stage 2 (every 2 steps; the kill may land inside the save after its step)
    assert resumed % 2 == 0 and STARTS["text_mlm"] < resumed <= killed_in_stage2 and killed_in_stage2 - resumed < 4
    third = subprocess.run(command, env=ENV, capture_output=True, text=True, check=True).stderr
    assert "stage 1/3" not in third and "stage 2/3" not in third and "stage 3/3 image_text" in third
    assert record_time(run_dir, "image_mim") == image_mim_done  # never re-run
    want, got = losses(uninterrupted), losses(run_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert keys(run_dir) == keys(uninterrupted)


@pytest.mark.slow
def test_one_job_per_stage_matches_one_job(run_data, uninterrupted, tmp_path):
    run_dir = tmp_path / "chain"
    for name in STEPS:
        run(run_data, run_dir, "--stage", name)
    want, got = losses(uninterrupted), losses(run_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    done = record_time(run_dir, "text_mlm")
    again = run(run_data, run_dir, "--stage", "text_mlm")  # a re-queued job: nothing to do
    assert "nothing to run" in again.stderr and record_time(run_dir, "text_mlm") == done
