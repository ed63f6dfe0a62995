"""`python -m vlmo_ds.train`: bad recipes stop before any work with one line; the same 2-rank run starts under
torchrun, the deepspeed launcher and mpirun; its TensorBoard events and metrics.jsonl hold the scalars."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_cli import ENV, losses, recipe_args, train_command
from vlmo_ds.parallel.env_readers import free_port
from vlmo_ds.train.__main__ import main

BAD = [
    ("optim.lr=-0.001", "optim.lr"),
    ("optim.learning_rate=1e-4", "optim.learning_rate"),
    ("stages.0.steps=ten", "stages.0.steps"),
    ("train.micro_batch=0", "train.micro_batch"),
    ("train.global_batch=30", "train.global_batch"),
    ("parallel.zero_stage=4", "parallel.zero_stage"),
    ("parallel.pipeline=2", "parallel"),
    ("parallel.tensor=3", "parallel.tensor"),
    ("model.preset=enormous", "model.preset"),
    ("model.hidden=3", "model.hidden"),
    ("model.dim=130", "model.dim"),
    ("precision=fp16", "precision"),
    ("deepspeed=ds_configs/missing.json", "deepspeed"),
    ("stages.0.kind=video", "stages.0.kind"),
    ("stages.0.loss_weights.itx=1", "stages.0.loss_weights.itx"),
    ("stages.0.trainable=[wings]", "stages.0.trainable"),
    ("stages.3.steps=5", "stages.3"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.warmup=5000", "optim.warmup"),
    ("train.resume=/no/such/checkpoint", "train.resume"),
    ("stages.0.data=/no/such/shards", "stages.0.data"),
    ("tokenizer=/no/such/tok.model", "tokenizer"),
    ("stages.0.crop_scale=[0.9, 0.5]", "stages.0.crop_scale"),
    ("seed", "seed"),
]


@pytest.mark.parametrize("override, key", BAD)
def test_bad_recipe_is_one_line_and_exit_2(override, key, capsys, run_data, tmp_path):
    args = recipe_args(run_data, tmp_path / "run", 2) + [override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err, err
    assert not (tmp_path / "run").exists()  # nothing started


LAUNCHERS = {
    "torchrun": lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), "-m", "vlmo_ds.train"],
    "deepspeed": lambda port: ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module",
                               "vlmo_ds.train"],
    "mpirun": lambda port: ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "-x", "DS_ACCELERATOR",
                            "-x", "OMP_NUM_THREADS", *train_command()],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_ranks_train_under_each_launcher(launcher, run_data, tmp_path):
    cmd = LAUNCHERS[launcher](free_port())
    beside_python = Path(sys.executable).parent / cmd[0]  # torchrun and deepspeed live in the environment's bin
    if beside_python.exists():
        cmd[0] = str(beside_python)
    elif shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} is not installed (mpirun: Debian's openmpi-bin)")
    run_dir = tmp_path / launcher
    proc = subprocess.run(cmd + recipe_args(run_data, run_dir, 3, 4, "train.global_batch=8"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(run_dir)) == [1, 2, 3]
    assert (run_dir / "samples_rank1.jsonl").is_file()  # the second rank trained on its own shard slice
    assert "rank 0/2" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_tensorboard_and_metrics_hold_the_scalars(run_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    subprocess.run(train_command(*recipe_args(run_data, run_dir, 3)), env=ENV, check=True, capture_output=True)
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/itc", "train/itm", "train/mlm", "opt/lr", "opt/grad_norm", "perf/samples_per_s",
                "perf/tokens_per_s", "perf/data_wait_s", "perf/peak_mem_mib"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert sorted(losses(run_dir)) == [1, 2, 3]
