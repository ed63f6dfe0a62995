"""Real multi-process starts under torchrun, the deepspeed launcher (alone, with a hostfile, and as two "nodes" in
--no_ssh node-rank mode), mpirun and srun (2 CPU processes, gloo); the deepspeed launcher with a hostfile also runs
the 2-rank training job.

Each run executes a small script (written at test time) that calls discover() and init_distributed(use_deepspeed=
True), all-reduces one number and prints its rank. TORCH_EXTENSIONS_DIR points into tmp_path, so a run that let
DeepSpeed compile its CPU shared-memory op would both take a minute and leave a folder there: the tests check neither
happened. The srun test runs on the local Slurm cluster of tests/slurm_cluster.py (skipped where Slurm and munge are
not installed) and gives up unless it gets an allocation within 30 s.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)
from train_cli import losses, recipe_args

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"}

SCRIPT = """
import torch
import torch.distributed as dist
from vlmo_ds.parallel.launch import describe, discover, init_distributed

env = discover()
init_distributed(env, backend="gloo", use_deepspeed=True)
total = torch.tensor([float(env.rank + 1)])
dist.all_reduce(total)
assert total.item() == env.world_size * (env.world_size + 1) / 2, total
assert (dist.get_rank(), dist.get_world_size()) == (env.rank, env.world_size)
print(describe(env), flush=True)
print(f"rank {env.rank}/{env.world_size} launcher {env.launcher} ok", flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    """The venv's console script, else one on PATH; skip when neither exists."""
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return str(path)


def _environ(tmp_path: Path) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items()
               if k == "SLURM_CONF" or (k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES))}
    environ.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    return environ


def _checked(output: str, returncode: int, tmp_path: Path) -> str:
    assert returncode == 0, output[-3000:]
    assert "built successfully" not in output and not (tmp_path / "torch_extensions").exists(), "shm op was compiled"
    return output


def _run(command: list[str], tmp_path: Path) -> str:
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    done = subprocess.run([*command, str(script)], cwd=tmp_path, env=_environ(tmp_path), capture_output=True,
                          text=True, timeout=180)
    return _checked(done.stdout + done.stderr, done.returncode, tmp_path)


def _check(output: str, launcher: str, master: str = "127.0.0.1") -> None:
    for rank in (0, 1):
        assert f"rank {rank}/2 launcher {launcher} ok" in output, output[-3000:]
        assert f"rank {rank}/2 (node 0, local {rank}/2) via {launcher}, master {master}:" in output


@pytest.mark.slow
def test_torchrun(tmp_path):
    command = [_tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port())]
    _check(_run(command, tmp_path), "torchrun")


@pytest.mark.slow
def test_deepspeed_launcher(tmp_path):
    # On a CPU-only machine the launcher counts one device (one NUMA node): --num_gpus 2 asks for two processes.
    # A missing --hostfile keeps it on this machine even where /job/hostfile exists.
    command = [_tool("deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
               "--hostfile", str(tmp_path / "no_hostfile")]
    _check(_run(command, tmp_path), "deepspeed")


@pytest.mark.slow
def test_deepspeed_launcher_no_ssh_two_nodes(tmp_path):
    # --no_ssh: the launcher starts only this node's processes, at --node_rank in the hostfile; run the same command
    # on every node (here: twice on one machine, as nodes "node-a" and "node-b" of one slot each).
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    port = _free_port()
    nodes = [subprocess.Popen([_tool("deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)],
                              cwd=tmp_path, env=_environ(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for node in (0, 1)]
    for node, proc in enumerate(nodes):
        output = _checked(proc.communicate(timeout=180)[0], proc.returncode, tmp_path)
        assert f"rank {node}/2 launcher deepspeed ok" in output, output[-3000:]
        assert f"rank {node}/2 (node {node}, local 0/1) via deepspeed, master 127.0.0.1:{port}" in output


@pytest.mark.slow
def test_deepspeed_launcher_hostfile_trains_two_ranks(run_data, tmp_path):
    # A hostfile makes the launcher check ssh and ask the first host for its address; on one host, skip the check
    # and name the master (several hosts: drop --no_ssh_check and let it ssh, or use --no_ssh per node).
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = tmp_path / "run"
    command = [_tool("deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "--num_gpus", "2", "--module", "vlmo_ds.train",
               *recipe_args(run_data, run_dir, 3, 4, "train.global_batch=8")]
    done = subprocess.run(command, cwd=REPO, env=_environ(tmp_path), capture_output=True, text=True, timeout=300)
    output = _checked(done.stdout + done.stderr, done.returncode, tmp_path)
    assert "rank 0/2 (node 0, local 0/2) via deepspeed" in output
    assert sorted(losses(run_dir)) == [1, 2, 3]
    assert (run_dir / "samples_rank1.jsonl").is_file()  # the second rank trained on its own shard slice


@pytest.mark.slow
def test_mpirun(tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun is not installed (Debian: apt-get install openmpi-bin libopenmpi-dev)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py)")
    if "Open MPI" not in subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("mpirun is not Open MPI (the test uses Open MPI's flags)")
    command = [mpirun, "-np", "2", "--allow-run-as-root", "--oversubscribe", sys.executable]
    _check(_run(command, tmp_path), "mpi")


@pytest.mark.slow
def test_srun(slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    srun, sinfo = shutil.which("srun"), shutil.which("sinfo")
    if srun is None or sinfo is None:
        pytest.skip("Slurm's srun is not installed")
    try:
        states = subprocess.run([sinfo, "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo does not answer")
    idle = [line.split()[0] for line in states.stdout.splitlines() if line.split()[1:] == ["idle"]]
    if states.returncode != 0 or not idle:
        pytest.skip("no Slurm cluster with an idle node answers")
    command = [srun, "--immediate=30", "-N", "1", "-n", "2", "-w", idle[0], sys.executable]
    _check(_run(command, tmp_path), "slurm", master=idle[0])
