"""Where this process sits in a vlmo_ds job, whichever launcher started it, and the torch.distributed start-up.

Users run ``python -m vlmo_ds.train RECIPE.yaml`` alone or under torchrun, the deepspeed launcher, srun or mpirun.
``discover()`` reads the launcher's environment into one DistEnv; ``init_distributed()`` starts the default process
group from it (through deepspeed.init_distributed when DeepSpeed is used, so its communication layer is set up too).

Precedence, first match wins. An outer launcher's variables are inherited by the processes of an inner one, so the
launcher closest to the process is read first:
1. RANK is set: torchrun (marked by LOCAL_WORLD_SIZE, GROUP_RANK or TORCHELASTIC_RUN_ID) or the deepspeed launcher
   (CROSS_RANK, CROSS_SIZE, LOCAL_SIZE); RANK / WORLD_SIZE without either mark are read the torchrun way. This wins
   over Slurm: torchrun or deepspeed started by srun (or in an sbatch script) leave SLURM_PROCID in the environment,
   and it counts srun tasks, not training processes.
2. OMPI_COMM_WORLD_RANK (Open MPI's mpirun) or PMI_RANK (MPICH, Intel MPI). This wins over Slurm because mpirun in a
   Slurm allocation starts its daemons with srun, so its processes carry SLURM_* values of the daemons. Exception:
   srun --mpi=pmi2 sets PMI_RANK itself; when it equals SLURM_PROCID in a Slurm step, srun is the launcher.
3. SLURM_PROCID inside a job step (SLURM_STEP_ID is set): srun. The batch script itself has SLURM_PROCID=0 and the
   job's SLURM_NTASKS but no step: a process started there directly runs alone (with a warning).
4. None of these: one process.
MASTER_ADDR and MASTER_PORT, when set, always win over derived values.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import timedelta

from vlmo_ds.parallel.env_readers import DistEnv, Vars, read_mpi, read_rank_vars, read_single, read_slurm

__all__ = ["DistEnv", "describe", "discover", "init_distributed"]

logger = logging.getLogger(__name__)


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's DistEnv from environ (default os.environ), by the precedence in the module docstring.

    Pure for every path but mpirun with more than one process and no MASTER_ADDR / MASTER_PORT, which asks the
    other ranks through mpi4py. ValueError names the variable when the values do not fit together.
    """
    v = Vars(os.environ if environ is None else environ)
    if v.first("RANK"):
        return read_rank_vars(v)
    if v.first("OMPI_COMM_WORLD_RANK"):
        return read_mpi(v)
    slurm_step = v.first("SLURM_PROCID") is not None and v.first("SLURM_STEP_ID", "SLURM_STEPID") is not None
    if v.first("PMI_RANK") and not (slurm_step and v.environ["PMI_RANK"].strip() == v.environ["SLURM_PROCID"].strip()):
        return read_mpi(v)
    if slurm_step:
        return read_slurm(v)
    tasks = v.environ.get("SLURM_NTASKS", "").strip()
    if tasks.isdigit() and int(tasks) > 1:
        logger.warning("SLURM_NTASKS=%s but this process is not an srun task (no SLURM_STEP_ID): running as one "
                       "process; start it with `srun python -m vlmo_ds.train ...` to use all tasks", tasks)
    return read_single(v)


def describe(env: DistEnv) -> str:
    """One log line, e.g. 'rank 3/8 (node 1, local 1/4) via slurm, master gpu001:12345'."""
    return (f"rank {env.rank}/{env.world_size} (node {env.node_rank}, local {env.local_rank}/"
            f"{env.local_world_size}) via {env.launcher}, master {env.master_addr}:{env.master_port}")


def export(env: DistEnv) -> None:
    """Write env into os.environ in torchrun's convention, for libraries that read it (DeepSpeed, megatron-core).

    All seven variables are written so that discover() in this process or its children (data loader workers)
    later reads the same numbers, reported as launcher "torchrun".
    """
    os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
                       "LOCAL_WORLD_SIZE": str(env.local_world_size), "GROUP_RANK": str(env.node_rank),
                       "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port)})


def init_distributed(env: DistEnv, backend: str | None = None, use_deepspeed: bool = True,
                     timeout_minutes: float = 30) -> None:
    """Start torch.distributed's default process group for env; nothing happens if it is already running.

    backend defaults to nccl when CUDA is available, else gloo. With CUDA, the process first selects its GPU
    (vlmo_ds.parallel.device.device_of: local_rank, or the one GPU per-task binding shows).
    """
    import torch
    import torch.distributed as dist

    from vlmo_ds.parallel.device import device_of

    if dist.is_initialized():
        return
    export(env)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device_of(env)
    timeout = timedelta(minutes=timeout_minutes)
    logger.info("starting torch.distributed (%s%s): %s", backend, ", DeepSpeed" if use_deepspeed else "",
                describe(env))
    if use_deepspeed:
        import deepspeed

        _skip_cpu_shm_op()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                                   init_method="env://", rank=env.rank, world_size=env.world_size, verbose=False)
    else:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)


def _skip_cpu_shm_op() -> None:
    """Keep DeepSpeed's CPU accelerator from compiling its shared-memory all-reduce op at start-up.

    DeepSpeed builds that op with g++ in its communication set-up (about 30-60 s on 2 cores the first time, and a
    failure where no compiler or ninja exists) but uses it only for DeepSpeed-inference's all-reduce; training
    collectives go through torch.distributed (gloo). Marking the op incompatible makes DeepSpeed fall back as it does
    on machines where the op cannot be built. GPU accelerators have no such op and are left alone.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and compatible is not None:
        compatible[builder.NAME] = False


def leave_spawned_rank(code: int = 0) -> None:
    """End a worker process spawned by torch.multiprocessing after its work, without interpreter teardown.

    destroy_process_group drops torch's own references, but DeepSpeed engines and megatron's parallel state keep the
    gloo process groups alive; their C++ worker threads are then destroyed during interpreter finalization, which
    rarely aborts the finished process (SIGABRT, "terminate called without an active exception") on a loaded
    2-core machine, and the spawning parent reports a failure. Results must be written before this call.
    """
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
