"""The planner's peak memory of the one-process image-text step (fp32, CPU, torch AdamW) against MemoryMeter's
measurement of the same step, model and optimizer state included, within 15%."""
import pytest

from vlmo_ds.model.config import preset
from vlmo_ds.plan.gpus import cpu_machine
from vlmo_ds.plan.layouts import single_process_estimate
from vlmo_ds.plan.step_check import measure_step

CPU = cpu_machine(gemm_rate=1e11, memory_bandwidth=1e10, kernel_overhead=1e-5, hbm_bytes=2**40)


def check(name: str, batch: int, checkpointing: bool) -> None:
    cfg = preset(name)
    # a warm-up step first: the optimizer state exists from then on, as in every later step
    measured = measure_step(cfg, batch, "cpu", "fp32", checkpointing, steps=1, warmup=1).peak_bytes
    predicted = single_process_estimate(cfg, CPU, "fp32", checkpointing, batch).memory.total
    print(f"{name} batch {batch} checkpointing {checkpointing}: measured {measured / 2**20:.1f} MiB, "
          f"predicted {predicted / 2**20:.1f} MiB ({predicted / measured:.3f})")
    assert abs(predicted / measured - 1) <= 0.15


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("batch", [2, 8])
def test_tiny_peak_memory(batch, checkpointing):
    check("tiny", batch, checkpointing)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("batch", [2, 4])
def test_base_peak_memory(batch, checkpointing):
    check("base", batch, checkpointing)
