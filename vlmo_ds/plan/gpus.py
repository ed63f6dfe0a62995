"""The machines the planner knows: datasheet figures per GPU kind (SXM parts, 8 per node), and a CPU measured here.

Rates are dense (no sparsity). `achievable` is the fraction of the peak a large GEMM reaches in practice (the rate
that cuBLAS's big square bf16 GEMMs measure), so step times are not quoted against a number no kernel reaches; MFU is
reported against the datasheet peak, as everyone reports it. Bandwidths are per GPU and per direction: NVLink within
a node, the InfiniBand rail (one NIC per GPU) between nodes. `kernel_overhead` is the fixed cost a kernel pays
beyond its bytes and FLOPs (launch, tail, and the host's dispatch when the host falls behind).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    name: str
    flops: dict
    """Peak dense FLOP/s by precision: "bf16", "amp" (bf16 autocast, same peak), "fp32" (TF32 tensor cores on GPUs:
    vlmo_ds turns TF32 on for fp32 configs)."""
    hbm_bytes: int
    """Device memory as torch.cuda.mem_get_info reports it (what the allocator can use)."""
    memory_bandwidth: float
    """Bytes/s of device memory."""
    intra_node_bandwidth: float
    """Bytes/s per GPU per direction to the other GPUs of its node (NVLink)."""
    inter_node_bandwidth: float
    """Bytes/s per GPU per direction to other nodes."""
    gpus_per_node: int = 8
    achievable: float = 0.8
    """The fraction of the peak FLOP/s a large GEMM reaches."""
    kernel_overhead: float = 2e-6
    """Seconds per op beyond its FLOPs and bytes that the device does not hide (launch gaps and tails; the host's
    dispatch runs ahead of a busy GPU)."""
    gemm_half_width: int = 128
    """The model's GEMMs (one side the width D) reach gemm_rate x D / (D + this): operand packing and tile edges
    cost per row, not per FLOP, so narrow models run below the big square GEMM's rate."""
    fused_optimizer: bool = True
    """The optimizer step is a few fused kernels (GPUs), not ops per parameter tensor (torch's CPU AdamW)."""
    attention_kernel: str = "flex"
    """What vlmo_ds.model.attention runs there: "flex" (no score tensor in memory) or "sdpa" (the math path)."""
    reserve_bytes: int = 2 * 2**30
    """CUDA context, cuBLAS / NCCL workspaces and the caching allocator's fragmentation, beyond tensors."""

    def gemm_rate(self, precision: str, width: int | None = None) -> float:
        """FLOP/s of a large GEMM, or of the GEMMs of a model of `width` D."""
        rate = self.flops[precision] * self.achievable
        return rate if width is None else rate * width / (width + self.gemm_half_width)


def _gpu(name: str, bf16: float, tf32: float, hbm_gib: float, bandwidth: float, nvlink: float, network: float,
         achievable: float) -> Machine:
    return Machine(name, {"bf16": bf16, "amp": bf16, "fp32": tf32}, int(hbm_gib * 2**30), bandwidth, nvlink,
                   network, achievable=achievable)


GPUS: dict[str, Machine] = {
    # NVLink 3 (A100) 600 GB/s, NVLink 4 (H100/H200) 900 GB/s, both directions; HDR 200 Gb/s and NDR 400 Gb/s NICs
    "a100-40gb": _gpu("a100-40gb", 312e12, 156e12, 39.4, 1.555e12, 300e9, 25e9, 0.8),
    "a100-80gb": _gpu("a100-80gb", 312e12, 156e12, 79.1, 2.039e12, 300e9, 25e9, 0.8),
    "h100-80gb": _gpu("h100-80gb", 989e12, 494e12, 79.1, 3.35e12, 450e9, 50e9, 0.75),
    "h200": _gpu("h200", 989e12, 494e12, 139.8, 4.8e12, 450e9, 50e9, 0.75),
}

DEVICE_NAMES = {"A100-SXM4-40GB": "a100-40gb", "A100-PCIE-40GB": "a100-40gb", "A100 80GB": "a100-80gb",
                "A100-SXM4-80GB": "a100-80gb", "H100": "h100-80gb", "H200": "h200"}


def gpu_kind(device_name: str) -> str | None:
    """The table's kind of a torch.cuda.get_device_name(), None when not in the table."""
    for key, kind in DEVICE_NAMES.items():
        if key in device_name:
            return kind
    return None


def cpu_machine(gemm_rate: float, memory_bandwidth: float, kernel_overhead: float, hbm_bytes: int) -> Machine:
    """This process's CPU as a Machine: the measured fp32 GEMM rate (achievable = 1: it is measured), memory
    bandwidth and per-op overhead; SDPA's math path; tensors only (no reserve)."""
    return Machine("cpu", {"fp32": gemm_rate, "bf16": gemm_rate, "amp": gemm_rate}, hbm_bytes, memory_bandwidth,
                   memory_bandwidth, memory_bandwidth, gpus_per_node=1, achievable=1.0,
                   kernel_overhead=kernel_overhead, gemm_half_width=96, fused_optimizer=False, attention_kernel="sdpa", reserve_bytes=0)
