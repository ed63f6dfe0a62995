"""Operational errors end with one line and a non-zero exit, not a traceback: a disk that fills during a checkpoint
save (writes go to /dev/full, which fails them as a full disk does) and one too full for the next checkpoint (the
free space reported small) say the space left and needed; a truncated safetensors file given to `eval --weights` or
to a stage's init_from names the file; a stage folder given as --weights is taken for its weights.safetensors, and a
folder without one says what it lacks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from train_cli import ENV, recipe_args, train_command
from vlmo_ds.eval.cli import main as eval_main

SAVE_INTO_DEV_FULL = """
import sys
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
original = TorchCheckpointEngine.save
def disk_full_at_step_4(self, state_dict, path):  # the disk fills up before the second checkpoint
    return original(self, state_dict, "/dev/full" if "step_00000004" in path else path)
TorchCheckpointEngine.save = disk_full_at_step_4
from vlmo_ds.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""

LITTLE_FREE_SPACE = """
import shutil, sys, types
shutil.disk_usage = lambda path: types.SimpleNamespace(total=10**9, used=10**9 - 5000, free=5000)  # a full disk
from vlmo_ds.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def one_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlmo_ds.train:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def train_with(script: str, run_data: Path, run_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "train.py"
    path.write_text(script)
    return subprocess.run([sys.executable, str(path), *recipe_args(run_data, run_dir, 6)], env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_a_disk_that_fills_during_a_save_is_one_line_with_the_space_left_and_needed(run_data, tmp_path):
    run_dir = tmp_path / "run"
    line = one_line(train_with(SAVE_INTO_DEV_FULL, run_data, run_dir, tmp_path))
    assert "could not write the checkpoint (a write failed" in line and "free in" in line, line
    assert "one checkpoint needs about" in line and "(the size of step_00000002)" in line, line
    assert "it resumes from step_00000002" in line, line
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"


def test_too_little_space_for_the_next_checkpoint_stops_before_writing(run_data, tmp_path):
    run_dir = tmp_path / "run"
    line = one_line(train_with(LITTLE_FREE_SPACE, run_data, run_dir, tmp_path))
    assert "not enough disk space for a checkpoint: 5.0 KB free in" in line, line
    assert "(estimated from the parameter and optimizer bytes)" in line and "it starts again" in line, line
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())


def truncated_weights(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(1000.0)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    return path


def eval_error(weights: Path, tmp_path: Path, capsys) -> str:
    status = eval_main(["retrieval", "--weights", str(weights), "--data", str(tmp_path / "none"),
                        "--tokenizer", str(tmp_path / "none.model")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("vlmo_ds.eval: "), err
    return err


def test_eval_weights_truncated_or_a_folder_are_one_line(tmp_path, capsys):
    cut = truncated_weights(tmp_path / "cut.safetensors")
    assert f"{cut} is truncated or corrupt" in eval_error(cut, tmp_path, capsys)
    stage = truncated_weights(tmp_path / "run" / "stages" / "vl" / "weights.safetensors").parent
    assert f"{stage / 'weights.safetensors'} is truncated or corrupt" in eval_error(stage, tmp_path, capsys)
    (tmp_path / "run" / "stages" / "vl" / "weights.safetensors").unlink()
    err = eval_error(stage, tmp_path, capsys)
    assert f"{stage} is a folder without weights.safetensors; give a stage's folder" in err, err
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text("{}")
    assert "it is a training checkpoint: consolidate it first" in eval_error(step, tmp_path, capsys)
    assert "it is a run folder: give one of" in eval_error(tmp_path / "run", tmp_path, capsys)


def test_a_truncated_init_from_is_one_line(run_data, tmp_path):
    cut = truncated_weights(tmp_path / "cut.safetensors")
    proc = subprocess.run(train_command(*recipe_args(run_data, tmp_path / "run", 2), f"stages.0.init_from={cut}"),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert f"{cut} is truncated or corrupt" in one_line(proc)
