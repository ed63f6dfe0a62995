"""Loader worker processes per rank when the recipe leaves train.num_workers unset: the CPU cores that serve this
rank's GPU, less one for the rank's own process (the training loop, kernel launches, the pin-memory thread).

Cores per GPU: the cores this process may run on (os.sched_getaffinity, which honours cgroups, taskset and
launcher binding) shared by the ranks of this node, unless each rank is a Slurm task bound to its own cores (srun
with --cpus-per-task: the affinity is then this task's alone). Under another launcher that binds ranks to disjoint
cores, set train.num_workers. A rank that reads for its whole replica
(vlmo_ds.data.replica) also gets the cores of the replica's other ranks on its node, which run no loader.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def cores_per_rank(local_world_size: int, slurm_tasks: bool) -> int:
    """CPU cores available to each rank of this node; slurm_tasks: every rank is an srun task."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if slurm_tasks and os.environ.get("SLURM_CPUS_PER_TASK") == str(cores):  # bound to this task alone
        return cores
    return max(1, cores // max(1, local_world_size))


def default_num_workers(local_world_size: int, slurm_tasks: bool = False, ranks_served: int = 1) -> int:
    """Workers for a loader feeding `ranks_served` ranks of this node (its replica's ranks here; 1 without one)."""
    per_rank = cores_per_rank(local_world_size, slurm_tasks)
    workers = max(1, per_rank * ranks_served - 1)
    logger.info("train.num_workers unset: %d loader workers (%d cores per rank x %d ranks served, one core kept for "
                "the training process)", workers, per_rank, ranks_served)
    return workers
