"""Real multi-process starts under torchrun, the deepspeed launcher, mpirun and srun (2 CPU processes, gloo).

Each run executes a small script (written at test time) that calls discover() and init_distributed(use_deepspeed=
True), all-reduces one number and prints its rank. TORCH_EXTENSIONS_DIR points into tmp_path, so a run that let
DeepSpeed compile its CPU shared-memory op would both take a minute and leave a folder there: the tests check neither
happened. The srun test runs only where a Slurm cluster answers (sinfo) and gives up unless it gets an allocation
within 30 s.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


def _run(command: list[str], tmp_path: Path) -> str:
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    environ = {k: v for k, v in os.environ.items()
               if k == "SLURM_CONF" or (k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES))}
    environ.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    done = subprocess.run([*command, str(script)], cwd=tmp_path, env=environ, capture_output=True, text=True,
                          timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "built successfully" not in output and not (tmp_path / "torch_extensions").exists(), "shm op was compiled"
    return output


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
def test_srun(tmp_path):
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
