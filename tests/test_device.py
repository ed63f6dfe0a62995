"""The device of a rank (vlmo_ds.parallel.device): local_rank when the process sees all of its node's GPUs, the one
visible GPU under per-task binding (srun --gpus-per-task=1), one line otherwise; and the CUDA start-up settings.
CUDA is simulated (this machine has none): torch.cuda's availability, count and set_device are replaced."""
from __future__ import annotations

import os

import pytest
import torch

from vlmo_ds.parallel.device import configure_cuda, device_index, device_of
from vlmo_ds.parallel.env_readers import DistEnv


def env(local_rank: int) -> DistEnv:
    return DistEnv(rank=4 + local_rank, world_size=8, local_rank=local_rank, local_world_size=4, node_rank=1,
                   master_addr="node0", master_port=29500, launcher="slurm")


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this process sees `count` GPUs; returns the list of set_device calls."""
    chosen: list[int] = []

    def see(count: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return see


def test_device_index():
    assert device_index(3, 8) == 3 and device_index(0, 1) == 0
    assert device_index(3, 1) == 0  # per-task binding: the one GPU this task sees
    with pytest.raises(RuntimeError, match="local rank 3 sees 2 GPUs"):
        device_index(3, 2)


def test_one_gpu_per_task(gpus, monkeypatch):
    # srun --gpus-per-task=1: task 3 of its node sees only physical GPU 5, which is cuda:0 to it
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    chosen = gpus(1)
    assert device_of(env(3)) == torch.device("cuda", 0)
    assert chosen == [0]
    assert os.environ["LOCAL_RANK"] == "0"  # DeepSpeed's engine and zero.Init take LOCAL_RANK for the device


def test_all_gpus_of_the_node(gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    chosen = gpus(4)
    assert device_of(env(3)) == torch.device("cuda", 3) and chosen == [3] and os.environ["LOCAL_RANK"] == "3"


def test_neither_one_nor_all_is_one_line(gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    gpus(2)
    with pytest.raises(RuntimeError) as err:
        device_of(env(3))
    assert "CUDA_VISIBLE_DEVICES=4,5" in str(err.value) and "\n" not in str(err.value)


def test_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_of(env(3)) == torch.device("cpu")
    assert configure_cuda(2, fp32=True) == []


@pytest.fixture
def clean_cuda_settings(monkeypatch):
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kept = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = kept


def test_start_up_settings_with_tensor_parallelism_in_fp32(clean_cuda_settings, caplog):
    with caplog.at_level("INFO", logger="vlmo_ds.parallel.device"):
        done = configure_cuda(2, fp32=True)
    assert len(done) == 3 and len(caplog.records) == 1
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_start_up_settings_leave_what_is_not_theirs(clean_cuda_settings, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert configure_cuda(1, fp32=False) == []  # no TP, bf16, the user's allocator settings
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
