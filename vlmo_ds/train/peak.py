"""The peak FLOP/s that MFU is measured against: the datasheet dense rate of known GPUs, else a GEMM measured here."""
from __future__ import annotations

import time

import torch

# Dense (no sparsity) tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name().
GPU_PEAKS = {torch.bfloat16: {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12},
             torch.float32: {"H200": 67e12, "H100": 67e12, "A100": 19.5e12, "L40S": 91.6e12, "A10G": 31.2e12}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(n: int, device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of a dense [n, n] @ [n, n] in this process: the ceiling a perfect model step could reach."""
    # Own generator: measuring must not advance the global RNG that drop path draws from (exact resume).
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Datasheet peak of a known GPU; otherwise (CPUs, unknown GPUs) a 1024^3 GEMM measured now."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAKS.get(dtype, {}).items():
            if key in name:
                return value
    return gemm_rate(1024, device, dtype)
