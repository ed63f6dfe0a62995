"""Readers of each launcher's environment variables into a DistEnv (vlmo_ds.parallel.launch picks which one).

Each reader takes the environment as a mapping and, except for MPI's host exchange, reads nothing else, so every
path can be tested with hand-written dicts. Errors are ValueErrors that name the variable and the fix.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

from vlmo_ds.parallel.hostlist import expand_nodelist, expand_tasks_per_node
from vlmo_ds.parallel.mpi_layout import gather_layout

LOCALHOST = "127.0.0.1"
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000  # every task of a job derives the same port from SLURM_JOB_ID
OMPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
PMI_VARS = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")  # MPICH's hydra and Intel MPI


@dataclass(frozen=True)
class DistEnv:
    """One process's place in a vlmo_ds job."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int  # number of processes in the job
    local_rank: int  # rank among the processes of this node (selects the GPU)
    local_world_size: int  # processes on this node
    node_rank: int  # index of this node, 0 .. nodes - 1
    master_addr: str  # host of rank 0, where torch.distributed's rendezvous store listens
    master_port: int
    launcher: str  # "single" | "torchrun" | "deepspeed" | "slurm" | "mpi"


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class Vars:
    """Typed reads from an environment mapping; every error names the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def first(self, *names: str) -> str | None:
        """The first of names that is set and not empty, or None."""
        return next((name for name in names if self.environ.get(name, "").strip()), None)

    def int(self, name: str, fix: str = "") -> int:
        text = self.environ.get(name, "").strip()
        if not text:
            raise ValueError(f"{name} is not set{fix}")
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not an integer; correct or unset it") from None

    def count(self, name: str, fix: str = "") -> int:
        """A number of processes: an integer of at least 1."""
        value = self.int(name, fix)
        if value < 1:
            raise ValueError(f"{name}={value}: a count of processes is at least 1")
        return value

    def master(self, world: int, default_addr: str | None, default_port: int | None, fix: str) -> tuple[str, int]:
        """MASTER_ADDR / MASTER_PORT when set (they always win), else the defaults; one process needs neither."""
        addr = self.environ.get("MASTER_ADDR", "").strip() or default_addr
        if self.first("MASTER_PORT"):
            port = self.int("MASTER_PORT")
            if not 1 <= port <= 65535:
                raise ValueError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
        else:
            port = default_port
        if world == 1:
            return addr or LOCALHOST, port or free_port()
        for name, value in (("MASTER_ADDR", addr), ("MASTER_PORT", port)):
            if not value:
                raise ValueError(f"{name} is not set and the world size is {world}: {fix}")
        return addr, port


def checked(env: DistEnv, names: Mapping[str, str]) -> DistEnv:
    """Reject impossible combinations; names maps a DistEnv field to the variable it was read from."""
    name = {field: names.get(field, field) for field in ("rank", "world_size", "local_rank", "local_world_size")}
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"{name['rank']}={env.rank} must lie in [0, {name['world_size']}={env.world_size})")
    if not 1 <= env.local_world_size <= env.world_size:
        raise ValueError(f"{name['local_world_size']}={env.local_world_size} must lie in [1, "
                         f"{name['world_size']}={env.world_size}]")
    if not 0 <= env.local_rank < env.local_world_size:
        raise ValueError(f"{name['local_rank']}={env.local_rank} must lie in [0, "
                         f"{name['local_world_size']}={env.local_world_size})")
    if env.node_rank < 0:
        raise ValueError(f"{names.get('node_rank', 'node_rank')}={env.node_rank} must not be negative")
    return env


def read_single(v: Vars) -> DistEnv:
    """No launcher: rank 0 of 1 on this host."""
    addr, port = v.master(1, LOCALHOST, None, "")
    return DistEnv(0, 1, 0, 1, 0, addr, port, "single")


def read_rank_vars(v: Vars) -> DistEnv:
    """torchrun, the deepspeed launcher, or hand-made RANK / WORLD_SIZE (torch's env:// convention)."""
    torchrun = v.first("LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID") is not None
    deepspeed = not torchrun and v.first("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE") is not None
    rank = v.int("RANK")
    world = v.count("WORLD_SIZE", " although RANK is: export both (torchrun and the deepspeed launcher do)")
    local_world_name = v.first("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    local_world = v.count(local_world_name) if local_world_name else world  # no count per node: one node
    local_rank = v.int("LOCAL_RANK") if v.first("LOCAL_RANK") else rank % local_world
    node_name = v.first("GROUP_RANK", "CROSS_RANK")
    node_rank = v.int(node_name) if node_name else rank // local_world  # the same count on every node
    addr, port = v.master(world, None, None, "export MASTER_ADDR (host of rank 0) and MASTER_PORT (a free port "
                                             "there), or start with torchrun or the deepspeed launcher")
    env = DistEnv(rank, world, local_rank, local_world, node_rank, addr, port,
                  "deepspeed" if deepspeed else "torchrun")
    checked(env, {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
                  "local_world_size": local_world_name or "WORLD_SIZE", "node_rank": node_name or "RANK"})
    if local_world_name is None and local_rank != rank:
        raise ValueError(f"LOCAL_RANK={local_rank} differs from RANK={rank}, so the job spans several nodes, but "
                         "LOCAL_WORLD_SIZE is not set: export LOCAL_WORLD_SIZE (processes per node)")
    return env


def read_slurm(v: Vars) -> DistEnv:
    """A task of an srun job step."""
    rank = v.int("SLURM_PROCID")
    world_name = v.first("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") or "SLURM_NTASKS"
    world = v.count(world_name, ": srun sets it; start the job with srun")
    local_rank, node_rank = v.int("SLURM_LOCALID"), v.int("SLURM_NODEID")
    counts_name = v.first("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
    if counts_name is None:
        raise ValueError("SLURM_TASKS_PER_NODE is not set: srun sets it; start the job with srun")
    try:
        counts = expand_tasks_per_node(v.environ[counts_name])
    except ValueError as err:
        raise ValueError(f"{counts_name}: {err}; srun writes it (N or N(xK) per node): start with srun") from err
    if len(counts) > 1 and sum(counts) != world:
        raise ValueError(f"{counts_name}={v.environ[counts_name]!r} adds up to {sum(counts)} tasks, not "
                         f"{world_name}={world}")
    if len(counts) > 1 and node_rank >= len(counts):
        raise ValueError(f"SLURM_NODEID={node_rank} but {counts_name}={v.environ[counts_name]!r} lists "
                         f"{len(counts)} nodes")
    local_world = counts[node_rank] if len(counts) > 1 else counts[0]  # one number: the same on every node
    addr, port = v.master(world, _slurm_first_host(v), _slurm_port(v),
                          "set MASTER_ADDR / MASTER_PORT, or run inside a Slurm job (SLURM_JOB_NODELIST, SLURM_JOB_ID)")
    env = DistEnv(rank, world, local_rank, local_world, node_rank, addr, port, "slurm")
    return checked(env, {"rank": "SLURM_PROCID", "world_size": world_name, "local_rank": "SLURM_LOCALID",
                         "local_world_size": counts_name, "node_rank": "SLURM_NODEID"})


def _slurm_first_host(v: Vars) -> str | None:
    """First host of the step's node list: srun's block and cyclic distributions both put task 0 there (an
    arbitrary distribution may not: set MASTER_ADDR then)."""
    name = v.first("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if name is None or v.first("MASTER_ADDR"):
        return None
    try:
        return expand_nodelist(v.environ[name])[0]
    except ValueError as err:
        raise ValueError(f"{name}: {err}; set MASTER_ADDR to the first host of the job instead") from err


def _slurm_port(v: Vars) -> int | None:
    """The same port on every task without talking: derived from the job id."""
    name = v.first("SLURM_JOB_ID", "SLURM_JOBID")
    if name is None:
        return None
    return SLURM_PORT_BASE + v.int(name) % SLURM_PORT_SPAN


def read_mpi(v: Vars) -> DistEnv:
    """A process of mpirun (Open MPI, or MPICH / Intel MPI through PMI_*)."""
    names = OMPI_VARS if v.first(OMPI_VARS[0]) else PMI_VARS
    rank_name, world_name, local_rank_name, local_world_name = names
    rank = v.int(rank_name)
    world = v.count(world_name, f" although {rank_name} is; the MPI launcher sets both")
    fix = "export MASTER_ADDR and MASTER_PORT (mpirun -x), or install mpi4py to exchange them"
    if world == 1:
        local_rank, local_world, node_rank, master = 0, 1, 0, (LOCALHOST, None)
    elif all(v.first(name) for name in ("MASTER_ADDR", "MASTER_PORT", local_rank_name, local_world_name)):
        # Everything is given: no MPI communication, so mpi4py is not needed. Node index assumes mpirun's
        # default placement (consecutive ranks fill a node).
        local_rank, local_world = v.int(local_rank_name), v.count(local_world_name)
        node_rank, master = rank // local_world, (None, None)
    else:
        # Rank 0 offers a port free on its host; the exchange also tells every rank where rank 0 runs.
        offer = free_port() if rank == 0 else 0
        local_rank, local_world, node_rank, addr, port = gather_layout(rank, world, offer, fix)
        master = (addr or LOCALHOST, port)
    addr, port = v.master(world, master[0], master[1], fix)
    env = DistEnv(rank, world, local_rank, local_world, node_rank, addr, port, "mpi")
    return checked(env, {"rank": rank_name, "world_size": world_name, "local_rank": local_rank_name,
                         "local_world_size": local_world_name, "node_rank": rank_name})
