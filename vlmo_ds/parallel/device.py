"""This process's accelerator, and the CUDA settings that must be in place before CUDA starts.

The device. A launcher's LOCAL_RANK counts the processes of a node; it is the GPU's number only when every process
sees all of the node's GPUs (torchrun, the deepspeed launcher, srun without GPU binding). Under per-task binding
(`srun --gpus-per-task=1`, CUDA_VISIBLE_DEVICES set per task) each process sees one GPU, number 0, whatever its
LOCAL_RANK. So: GPU local_rank when it is visible, else the only visible GPU; torch.cuda.set_device selects it, and
LOCAL_RANK is rewritten to that number, because DeepSpeed reads LOCAL_RANK as the device (its engine's device and
zero.Init's), and it must agree with the device vlmo_ds chose.

Start-up settings (configure_cuda, before the first CUDA call, logged once):
    CUDA_DEVICE_MAX_CONNECTIONS=1   with tensor parallelism: one hardware queue, so the tensor-parallel all-reduces
                                    are issued in program order and overlap compute as megatron-core schedules them
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True   unless the user set it: VLMo's passes allocate activations of
                                    several shapes (unimodal, fused, 4x the rows for ITM); growing segments instead
                                    of caching fixed blocks avoids fragmentation as the batch shapes alternate
    TF32 matmuls and convolutions  for fp32 runs (a 10-bit mantissa in the GEMM inputs, fp32 accumulation; set
                                    NVIDIA_TF32_OVERRIDE=0 to keep full fp32); bf16 runs do not use fp32 GEMMs
"""
from __future__ import annotations

import logging
import os

import torch

from vlmo_ds.parallel.env_readers import DistEnv

log = logging.getLogger(__name__)


def device_index(local_rank: int, visible: int) -> int:
    """The GPU number a process with this node-local rank uses when it sees `visible` GPUs (module docstring)."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise RuntimeError(f"local rank {local_rank} sees {visible} GPUs (CUDA_VISIBLE_DEVICES={shown}): give every "
                       "process all of its node's GPUs or exactly one (srun --gpus-per-task=1)")


def device_of(env: DistEnv) -> torch.device:
    """This process's device: the GPU chosen by device_index (selected with torch.cuda.set_device), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = device_index(env.local_rank, torch.cuda.device_count())
    torch.cuda.set_device(index)
    os.environ["LOCAL_RANK"] = str(index)  # what DeepSpeed takes for the device (module docstring)
    return torch.device("cuda", index)


def configure_cuda(tensor_parallel: int, fp32: bool) -> list[str]:
    """The start-up settings of the module docstring for a run with this tensor-parallel size and precision; call
    it before anything touches CUDA. Returns what it set (also logged, once); nothing without CUDA."""
    if not torch.cuda.is_available():
        return []
    done = []
    if tensor_parallel > 1:
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        done.append("CUDA_DEVICE_MAX_CONNECTIONS=1 (tensor parallelism)")
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        done.append("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    if fp32:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        done.append("TF32 matmuls and convolutions (fp32 run)")
    log.info("CUDA start-up settings: %s", "; ".join(done) or "none")
    return done
