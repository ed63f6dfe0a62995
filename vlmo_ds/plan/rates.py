"""This machine's rates for the step-time model, measured in this process: the dense GEMM rate
(vlmo_ds.train.peak.gemm_rate), memory bandwidth (a large copy: bytes read + written per second) and the fixed
cost of one small op (dispatch and launch). With them the planner's model of a step speaks for this machine, and
the same model, given a GPU's datasheet figures (vlmo_ds.plan.gpus), speaks for that GPU.
"""
from __future__ import annotations

import statistics
import time

import torch

from vlmo_ds.plan.gpus import Machine, cpu_machine
from vlmo_ds.train.peak import gemm_rate, synchronize


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s of dst.copy_(src) over `mib` MiB, counting the read and the write."""
    src = torch.ones(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * src.nbytes * repeats / (time.perf_counter() - start)


def op_overhead(device: torch.device, ops: int = 400, elements: int = 16384) -> float:
    """Seconds an op of a training step costs beyond its bytes: a chain of small multiplies (16k elements, under
    the CPU's parallel grain) run forward and backward (autograd's nodes, the allocator, dispatch), per op."""
    x = torch.ones(elements, device=device, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(ops):
            y = y * 1.0001
        y.sum().backward()

    chain()
    synchronize(device)
    start = time.perf_counter()
    chain()
    synchronize(device)
    return (time.perf_counter() - start) / (2 * ops)


def measured_machine(device: torch.device | str = "cpu", gemm_size: int = 2048, samples: int = 5) -> Machine:
    """This CPU as a Machine (fp32): the three rates measured now, each the median of `samples` measurements (the
    machine is shared: one measurement can catch a neighbour's burst)."""
    device = torch.device(device)

    def median(measure) -> float:
        return statistics.median(measure() for _ in range(samples))

    return cpu_machine(median(lambda: gemm_rate(gemm_size, device, torch.float32)),
                       median(lambda: copy_bandwidth(device)), median(lambda: op_overhead(device)), hbm_bytes=2**40)
