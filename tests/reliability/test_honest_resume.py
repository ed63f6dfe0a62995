"""Honest resume: a checkpoint records the recipe its stage was trained with; a resume under another recipe refuses
with one line listing the changes (old -> new) and the fix, unless train.allow_resume_changes accepts them; fewer
steps than the stage has trained are always refused; more steps, when allowed, re-plan the decay from the
checkpoint's step, and a later resume keeps the re-planned decay."""
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from train_cli import ENV, recipe_args, train_command
from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.config import ConfigError, load_config
from vlmo_ds.config.plan import resume_changes
from vlmo_ds.model.config import preset
from vlmo_ds.train.metrics import read_metrics
from vlmo_ds.train.optim import LrSchedule
from vlmo_ds.train.resume_check import check_resume

STEPS = 4
PEAK = 1e-3  # tiny_image_text's optim.lr; its warm-up (5% of 4 steps) is 0 steps


def train(data: Path, run_dir: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    args = recipe_args(data, run_dir, steps, 4, "train.log_every=1", *extra)
    return subprocess.run(train_command(*args), env=ENV, capture_output=True, text=True, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("vlmo_ds.train:")]


def refused(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a refused resume."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, lines
    return lines[0]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def learning_rates(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["opt/lr"] for r in read_metrics(run_dir / "metrics.jsonl") if "opt/lr" in r}


@pytest.fixture(scope="module")
def stopped(run_data, tmp_path_factory):
    """A 4-step stage stopped after step 1 (train.deadline_minutes) with its checkpoint step_00000001."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    proc = train(run_data, run_dir, STEPS, "train.deadline_minutes=1e-6")
    assert proc.returncode == 75, proc.stderr[-3000:]
    return run_dir


@pytest.fixture
def resumable(stopped, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    return run_dir


@pytest.mark.slow
def test_each_changed_setting_is_listed_in_one_line(run_data, resumable, tmp_path):
    other = tmp_path / "same_pairs_elsewhere"
    other.symlink_to(run_data / "pretrain_pairs")
    before = checkpoints(resumable)
    proc = train(run_data, resumable, STEPS, "train.global_batch=8", "train.micro_batch=2", "seed=3",
                 "optim.lr=1e-4", "model.drop_path_rate=0.1", f"stages.0.data={other}")
    line = refused(proc)
    for change in ("global_batch 4 -> 8", "micro_batch 4 -> 2", "seed 0 -> 3", "lr 0.001 -> 0.0001",
                   "model.drop_path_rate 0.0 -> 0.1", f"{other}"):
        assert change in line, (change, line)
    assert "train.allow_resume_changes=global_batch,schedule" in line and "train.resume=none" in line, line
    assert checkpoints(resumable) == before and max(learning_rates(resumable)) == 1


@pytest.mark.slow
def test_fewer_steps_than_trained_are_refused_even_when_allowed(run_data, tmp_path):
    run_dir = tmp_path / "run"
    done = train(run_data, run_dir, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    resume = f"train.resume={run_dir / 'checkpoints' / 'step_00000002'}"
    for allow in ((), ("train.allow_resume_changes=steps",)):
        line = refused(train(run_data, run_dir, 1, resume, *allow))
        assert "steps 2 -> 1" in line and "at least 2" in line, line
    record = json.loads((run_dir / "stages" / "image_text" / "stage.json").read_text())
    assert record["steps"] == 2 and record["global_step"] == 2


@pytest.mark.slow
def test_more_steps_are_refused_unless_allowed(run_data, resumable):
    line = refused(train(run_data, resumable, 8))
    assert "steps 4 -> 8" in line and "train.allow_resume_changes=steps" in line, line


@pytest.mark.slow
def test_allowed_steps_and_batch_replan_the_decay_from_the_checkpoint(run_data, resumable):
    # stopped after 1 of 4 steps: the next rate is PEAK x 3/4; with 8 steps it decays from there to 0 at step 8
    allow = "train.allow_resume_changes=steps,global_batch"
    first = train(run_data, resumable, 8, "train.global_batch=8", allow, "train.deadline_minutes=1e-6")
    assert first.returncode == 75, first.stderr[-3000:]
    assert "steps 4 -> 8, global_batch 4 -> 8" in first.stderr and "decays from 0.00075 at stage step 1" in \
        first.stderr, first.stderr[-3000:]
    # resumed again (the recorded recipe now has 8 steps): the re-planned decay goes on
    second = train(run_data, resumable, 8, "train.global_batch=8")
    assert second.returncode == 0, second.stderr[-3000:]
    rates = learning_rates(resumable)
    assert rates[1] == pytest.approx(PEAK)
    for step in range(2, 9):  # global step s runs stage step s - 1
        assert rates[step] == pytest.approx(PEAK * 3 / 4 * (8 - (step - 1)) / 7), step
    record = json.loads((resumable / "stages" / "image_text" / "stage.json").read_text())
    assert record["steps"] == 8 and record["global_step"] == 8


def saved_checkpoint(tmp_path: Path, **changes) -> Path:
    """A step_00000002 folder whose trainer.json records a recipe (changes: top-level entries replaced)."""
    path = tmp_path / "checkpoints" / "step_00000002"
    path.mkdir(parents=True)
    recipe = {"steps": 4, "steps_before": 0, "global_batch": 4, "micro_batch": 4, "lr": PEAK, "warmup": 0.05,
              "end_lr": 0.0, "data": [["shards", 1.0]], "image_size": 64, "text_len": 40, "seed": 0,
              "preset": "tiny", "kind": "image_text", "trainable": "all"}
    trainer = {"step": 2, "stage": "image_text", "stage_step": 2, "model": dataclasses.asdict(preset("tiny")),
               "layout": {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 0}, "recipe": recipe,
               "lr_schedule": dataclasses.asdict(LrSchedule(PEAK, 0, 0.0, 4))} | changes
    (path / "trainer.json").write_text(json.dumps(trainer))
    return path


def test_an_allowed_schedule_change_takes_the_new_schedule_from_the_checkpoint(tmp_path):
    path = saved_checkpoint(tmp_path)
    recipe = json.loads((path / "trainer.json").read_text())["recipe"] | {"lr": PEAK / 2}
    new = LrSchedule(PEAK / 2, 0, 0.0, 4)
    with pytest.raises(CheckpointError, match=r"lr 0.001 -> 0.0005; to accept schedule changes, pass "
                                              r"train.allow_resume_changes=schedule$"):
        check_resume(path, recipe, preset("tiny"), new, ())
    schedule, note = check_resume(path, recipe, preset("tiny"), new, ("schedule",))
    assert schedule == new and "the new schedule applies from step 2 (lr 0.00025, was 0.0005)" in note


def test_an_unchanged_recipe_resumes_with_the_recorded_schedule(tmp_path):
    replanned = LrSchedule(PEAK, 0, 0.0, 4).replanned(1, 8)
    path = saved_checkpoint(tmp_path, lr_schedule=dataclasses.asdict(replanned))
    recipe = json.loads((path / "trainer.json").read_text())["recipe"]
    schedule, note = check_resume(path, recipe, preset("tiny"), LrSchedule(PEAK, 0, 0.0, 4), ())
    assert schedule == replanned and note is None


def test_a_checkpoint_without_a_recorded_recipe_resumes_with_a_warning(tmp_path):
    path = saved_checkpoint(tmp_path)
    trainer = json.loads((path / "trainer.json").read_text())
    del trainer["recipe"], trainer["lr_schedule"]
    (path / "trainer.json").write_text(json.dumps(trainer))
    fresh = LrSchedule(PEAK, 0, 0.0, 8)
    schedule, note = check_resume(path, {}, preset("tiny"), fresh, ())
    assert schedule == fresh and "records no recipe" in note and "\n" not in note


def test_allowed_changes_are_names_a_resume_can_accept():
    base = ["run_dir=/tmp/x", "tokenizer=tok.model"]
    cfg = load_config("tiny_image_text", base + ["train.allow_resume_changes=steps,global_batch"], world_size=1)
    assert resume_changes(cfg) == ("steps", "global_batch")
    cfg = load_config("tiny_image_text", base + ["train.allow_resume_changes=[schedule]"], world_size=1)
    assert resume_changes(cfg) == ("schedule",)
    with pytest.raises(ConfigError, match=r"'stepz' is not a change a resume can accept \(did you mean 'steps'"):
        load_config("tiny_image_text", base + ["train.allow_resume_changes=stepz"], world_size=1)
