"""The planner's step-time model, given this machine's rates measured in the same process (GEMM, copy bandwidth,
per-op cost: vlmo_ds.plan.rates), against the measured one-process image-text step (fp32, CPU), within 25%."""
import pytest
import torch

from vlmo_ds.model.config import preset
from vlmo_ds.plan.layouts import single_process_estimate
from vlmo_ds.plan.rates import measured_machine
from vlmo_ds.plan.step_check import measure_step


def check(name: str, batch: int, steps: int) -> None:
    cfg = preset(name)
    measured = measure_step(cfg, batch, "cpu", "fp32", steps=steps, warmup=2, track_memory=False).seconds
    machine = measured_machine(torch.device("cpu"))  # right after the step: the same load on this machine
    e = single_process_estimate(cfg, machine, "fp32", False, batch)
    s = e.step
    print(f"{name} batch {batch}: measured {measured:.3f} s, predicted {e.step_seconds:.3f} s "
          f"({e.step_seconds / measured:.3f}; compute {s.compute:.3f}, traffic {s.traffic:.3f}, "
          f"overhead {s.overhead:.3f}; GEMM {machine.flops['fp32'] / 1e9:.0f} GFLOP/s, copy "
          f"{machine.memory_bandwidth / 1e9:.1f} GB/s, op {machine.kernel_overhead * 1e6:.1f} us)")
    assert abs(e.step_seconds / measured - 1) <= 0.25


@pytest.mark.parametrize("batch", [2, 8])
def test_tiny_step_time(batch):
    check("tiny", batch, steps=5)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [2, 4])
def test_base_step_time(batch):
    check("base", batch, steps=1)
