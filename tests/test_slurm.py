"""slurm/ under a real single-node Slurm cluster (tests/slurm_cluster.py; skipped where Slurm and munge are not
installed): the pre-training sbatch script with the CPU override runs 2 gloo tasks and writes a checkpoint;
SIGUSR1 sent to the tasks (`scancel -s USR1`), and later to the batch shell (`scancel --batch -s USR1`, the path of
`--signal=B:USR1@120`), each leads to a checkpoint, a requeue and an automatic resume that ends with the uninterrupted
run's losses; the stage chain submitter runs one job per stage in order. Without Slurm: the scripts parse, every
#SBATCH line explains itself, and the launch helper's environment (CPU override, checkout check)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import LocalSlurm, slurm_cluster  # noqa: F401  (the fixture)
from test_stage_recipes import stagewise_args
from train_cli import losses, recipe_args

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
STEPS = 12
CPU_JOB = ["--gpus-per-node=0", "--nodes=1", "--cpus-per-task=1", "--time=10"]
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"}
STOPPED = re.compile(r"\[rank (\d)\] WARNING \S+: signal SIGUSR1: every rank stopped after step (\d+)")


def job_env(cluster: LocalSlurm) -> dict[str, str]:
    """The submitting environment: the cluster's SLURM_CONF, the CPU override, this Python, no launcher variables."""
    env = {k: v for k, v in cluster.env.items()
           if k == "SLURM_CONF" or (k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES))}
    env.update(VLMO_CPU="1", VLMO_ROOT=str(REPO), VLMO_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return env


def submit_pretrain(cluster: LocalSlurm, data: Path, run_dir: Path, log: Path) -> int:
    args = recipe_args(data, run_dir, STEPS, 4, "train.global_batch=8")
    return cluster.sbatch(*CPU_JOB, "--ntasks-per-node=2", f"--output={log}", str(SLURM / "pretrain.sbatch"), *args,
                          env=job_env(cluster))


def keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    lines = (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}  # a resumed step overwrites the stopped run's


def wait_for_step(cluster: LocalSlurm, job: int, run_dir: Path, step: int, restarts: int, timeout: float = 120):
    """Until the job's attempt number `restarts` has logged training step `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        running = info.get("JobState") == "RUNNING" and info.get("Restarts") == str(restarts)
        if running and (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.1)
    raise TimeoutError(f"job {job} did not reach step {step} in run {restarts}: {cluster.job(job)}")


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, run_data, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("slurm_whole")
    job = submit_pretrain(slurm_cluster, run_data, root / "run", root / "job.log")
    info = slurm_cluster.wait(job)
    return root, info


@pytest.mark.slow
def test_pretrain_script_trains_two_tasks_and_checkpoints(uninterrupted):
    root, info = uninterrupted
    log = (root / "job.log").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-3000:]
    run_dir = root / "run"
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert "rank 0/2 (node 0, local 0/2) via slurm" in log and "| CPU |" in log
    assert sorted(keys(run_dir, 1)) == list(range(1, STEPS + 1))  # the second task trained on its own slice
    assert set(keys(run_dir, 0)[1]).isdisjoint(keys(run_dir, 1)[1])
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{STEPS:08d}"
    assert {p.name for p in (checkpoints / f"step_{STEPS:08d}").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
    assert (run_dir / "stages" / "image_text" / "stage.json").is_file()


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm_cluster, run_data, uninterrupted, tmp_path):  # noqa: F811
    cluster, run_dir, log = slurm_cluster, tmp_path / "run", tmp_path / "job.log"
    job = submit_pretrain(cluster, run_data, run_dir, log)
    wait_for_step(cluster, job, run_dir, 2, restarts=0)
    cluster.run("scancel", "-s", "USR1", str(job))  # to the tasks, as `scancel -s USR1` or --signal=USR1@T
    wait_for_step(cluster, job, run_dir, 0, restarts=1, timeout=60)
    first = [int(n) for _, n in STOPPED.findall(log.read_text())]
    wait_for_step(cluster, job, run_dir, first[0] + 2, restarts=1)
    cluster.run("scancel", "--batch", "-s", "USR1", str(job))  # to the batch shell, as --signal=B:USR1@T
    info = cluster.wait(job)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), text[-4000:]
    stops = STOPPED.findall(text)
    assert len(stops) == 4, text[-4000:]  # two stops, each logged by both ranks at the same step
    (rank_a, step_1), (rank_b, step_1b), (rank_c, step_2), (rank_d, step_2b) = stops
    assert {rank_a, rank_b} == {rank_c, rank_d} == {"0", "1"} and step_1 == step_1b and step_2 == step_2b
    assert 2 <= int(step_1) < int(step_2) < STEPS
    assert "SIGUSR1 for the batch shell: passed to the training processes" in text
    assert text.count(f"requeued Slurm job {job}") == 2
    for step in (step_1, step_2):
        assert f"resumed at step {step} from {run_dir / 'checkpoints' / f'step_{int(step):08d}'}" in text
    whole = uninterrupted[0] / "run"
    want, got = losses(whole), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert keys(run_dir, 0) == keys(whole, 0) and keys(run_dir, 1) == keys(whole, 1)


@pytest.mark.slow
def test_stage_chain_runs_one_job_per_stage_in_order(slurm_cluster, run_data, tmp_path):  # noqa: F811
    cluster, run_dir = slurm_cluster, tmp_path / "run"
    done = cluster.run(str(SLURM / "submit_stages.sh"), *CPU_JOB, "--ntasks-per-node=1",
                       f"--output={tmp_path}/%x-%j.log", "--", *stagewise_args(run_data, run_dir),
                       env=job_env(cluster), timeout=120)
    jobs = dict(line.split() for line in done.stdout.splitlines())
    assert list(jobs) == ["image_mim", "text_mlm", "image_text"]
    infos = {stage: cluster.wait(int(job)) for stage, job in jobs.items()}
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    for stage, info in infos.items():
        assert info["JobState"] == "COMPLETED", logs[-4000:]
        assert info["JobName"] == f"vlmo-{stage}"
        assert (run_dir / "stages" / stage / "stage.json").is_file()
    assert infos["text_mlm"]["StartTime"] >= infos["image_mim"]["EndTime"]
    assert infos["image_text"]["StartTime"] >= infos["text_mlm"]["EndTime"]
    assert sorted(losses(run_dir)) == list(range(1, 7))  # 2 steps a stage, numbered across stages


def test_stage_chain_refuses_a_bad_recipe_before_queueing(slurm_cluster, run_data, tmp_path):  # noqa: F811
    done = slurm_cluster.run(str(SLURM / "submit_stages.sh"), *CPU_JOB, "--",
                             *stagewise_args(run_data, tmp_path / "run", "optim.lr=-1"),
                             env=job_env(slurm_cluster), check=False, timeout=120)
    assert done.returncode == 2 and "optim.lr" in done.stderr, done.stderr
    assert done.stdout == "" and slurm_cluster.run("squeue", "-h").stdout.strip() == ""


@pytest.mark.parametrize("script", [*SCRIPTS, SLURM / "launch.sh", SLURM / "submit_stages.sh"],
                         ids=lambda p: p.name)
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_sbatch_line_is_explained_and_launches_through_the_helper(script):
    lines = script.read_text().splitlines()
    options = [line for line in lines if line.startswith("#SBATCH")]
    # an evaluation has no checkpoint to write before a time limit: only the training scripts ask for the signal
    needed = {"--requeue", "--open-mode=append"} | ({"--signal=B:USR1@120"} if script.name != "eval.sbatch" else set())
    assert needed <= {line.split()[1] for line in options}
    for line in options:
        assert re.fullmatch(r"#SBATCH --[a-z-]+=?\S*\s+# \S.*", line), line
    assert 'source "${VLMO_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"' in "\n".join(lines)


def _helper_env(**extra: str) -> dict[str, str]:
    """The environment vlmo_env leaves, as KEY=VALUE lines (no Slurm needed)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS
               and k not in {"OMP_NUM_THREADS", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "VLMO_REQUEUE"}}
    environ.update(extra)
    done = subprocess.run(["bash", "-c", f"source {SLURM / 'launch.sh'} && vlmo_env && env"], env=environ,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def test_launch_helper_cpu_override_and_defaults():
    cpu = _helper_env(VLMO_ROOT=str(REPO), VLMO_CPU="1", SLURM_CPUS_PER_TASK="3")
    assert (cpu["DS_ACCELERATOR"], cpu["CUDA_VISIBLE_DEVICES"], cpu["OMP_NUM_THREADS"]) == ("cpu", "", "3")
    assert (cpu["SRUN_CPUS_PER_TASK"], cpu["VLMO_REQUEUE"], cpu["VLMO_PYTHON"]) == ("3", "1", "python3")
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in cpu
    gpu = _helper_env(VLMO_ROOT=str(REPO), VLMO_REQUEUE="0")
    assert (gpu["TORCH_NCCL_ASYNC_ERROR_HANDLING"], gpu["OMP_NUM_THREADS"], gpu["VLMO_REQUEUE"]) == ("1", "1", "0")
    assert "DS_ACCELERATOR" not in gpu


def test_launch_helper_names_a_missing_checkout(tmp_path):
    done = subprocess.run(["bash", "-c", f"source {SLURM / 'launch.sh'} && vlmo_env"], capture_output=True,
                          text=True, env={**os.environ, "VLMO_ROOT": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.strip() == (f"slurm/launch.sh: no vlmo_ds checkout at {tmp_path}; submit from the checkout "
                                   "or set VLMO_ROOT")
