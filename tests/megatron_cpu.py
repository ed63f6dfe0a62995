"""Test setup for megatron-core on CPU processes (gloo): runtime shims and parallel-state set-up inside a worker.

megatron-core assumes CUDA in a few places that the tensor-parallel layers with use_cpu_initialization avoid, but its
RNG tracker (dropout in its own modules, its activation checkpointing) and pipeline/p2p code ask for CUDA devices and
CUDA RNG states: torch.cuda.current_device() for receive buffers, torch.cuda.synchronize() after exchanging tensor
shapes, and torch.zeros(..., device="cuda") for the schedules' token counters. These shims replace exactly those
calls, in the test process only; the product never imports this (on GPUs the calls are the real ones).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import schedules as megatron_schedules
from megatron.core.tensor_parallel import random as megatron_random

from vlmo_ds.parallel import layout_rules


class CpuRNGTracker:
    """megatron's CudaRNGStatesTracker interface (add / fork / get_states / set_states / reset) over torch's CPU
    generator: fork(name) runs its block with the named stream and restores the default stream after."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if name in self.states_:
            raise ValueError(f"RNG state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise ValueError(f"RNG state {name} was not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _CpuTorch:
    """torch as megatron's schedules module sees it, with torch.zeros(..., device="cuda") made on the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs) -> torch.Tensor:
        return torch.zeros(*size, device=None if device == "cuda" else device, **kwargs)


def install_cpu_shims() -> None:
    """torch.cuda.current_device -> "cpu", torch.cuda.synchronize -> no-op, CPU token counters in megatron's
    schedules, and a CPU RNG tracker as megatron's tracker (idempotent)."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    megatron_schedules.torch = _CpuTorch()
    if not isinstance(megatron_random._CUDA_RNG_STATE_TRACKER, CpuRNGTracker):
        megatron_random._CUDA_RNG_STATE_TRACKER = CpuRNGTracker()
        megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def allow_cpu_pipeline() -> None:
    """Let the trainer build pipeline stages on CPU: the product refuses PP > 1 without CUDA
    (vlmo_ds.parallel.layout_rules.check_pipeline_device), because megatron's schedules need the GPU calls that
    install_cpu_shims replaces; in a process with the shims installed that refusal does not apply."""
    install_cpu_shims()
    layout_rules.check_pipeline_device = lambda pp, cuda_available: None


def init_megatron(tensor: int = 1, pipeline: int = 1) -> None:
    """Inside a gloo worker whose default process group is up: shims, then megatron's parallel state
    (tensor x pipeline x data = world; data-parallel size is what is left)."""
    if not dist.is_initialized():
        raise RuntimeError("init_megatron needs torch.distributed initialised first (tests/distributed.run_ranks)")
    install_cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor,
                                             pipeline_model_parallel_size=pipeline)
