"""Run a test function on several gloo ranks (CPU processes) and collect what each rank returns."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses
from vlmo_ds.parallel.env_readers import free_port
from vlmo_ds.parallel.launch import DistEnv, init_distributed, leave_spawned_rank


def _worker(rank: int, world: int, port: int, out_dir: str, use_deepspeed: bool, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, node_rank=0,
                  master_addr="127.0.0.1", master_port=port, launcher="torchrun")
    init_distributed(env, backend="gloo", use_deepspeed=use_deepspeed)
    result = fn(rank, world, *args)  # an exception ends this process with a traceback, as spawn expects
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    leave_spawned_rank()


def run_ranks(fn, world: int, *args, use_deepspeed: bool = False) -> list:
    """fn(rank, world, *args) on `world` processes; returns their results in rank order. fn must be importable.

    use_deepspeed: start the process group through DeepSpeed (as the trainer does) for tests of DeepSpeed engines.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, free_port(), tmp, use_deepspeed, fn, args), nprocs=world,
                           join=True, start_method="spawn")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def global_mean(value: torch.Tensor) -> float:
    """A scalar's mean over the ranks of the default group, read on the host (the trainer reads once per log
    interval instead: vlmo_ds.train.scalars)."""
    total = value.detach().float().clone()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def image_text_engine_step(engine, batch: dict, rank: int, world: int, seed: int) -> float:
    """One image_text_losses micro-step of a DeepSpeed engine on this rank's share of `batch` (split by rank, as
    data parallelism splits the global batch): the global mean loss."""
    local = {k: v.chunk(world)[rank] for k, v in batch.items()}
    out = engine(image_text_losses, local, LossWeights(), seed, None)
    engine.backward(out["loss"])
    engine.step()
    return global_mean(out["loss"])


def close_in_norm(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5, atol: float = 1e-6) -> bool:
    """||a - b|| <= rel ||b|| + atol sqrt(n): torch.allclose's rule on the tensor as a whole (its root-mean-square
    difference) rather than per element; how the layouts' weights are compared with one process after AdamW steps.
    An element whose gradient is near eps (1e-8) moves by up to lr times the relative rounding difference of that
    tiny gradient (another layout sums partial products, stages or ranks in another order, and the CPU's GEMM kernels
    block another batch size differently), so single elements may differ by ~1e-4 of the tensor's largest value
    while the tensor as a whole agrees to ~1e-6; atol covers tensors that start at zero (biases)."""
    return ((a - b).norm() <= rel * b.norm() + atol * b.numel() ** 0.5).item()
