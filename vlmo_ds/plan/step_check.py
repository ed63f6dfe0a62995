"""Measure one process's image-text pre-training step (ITC both paths, ITM with hard negatives, MLM; backward; AdamW)
beside the planner's prediction of it: the check behind the planner's tests and tools/gpu_check.sh.

    python -m vlmo_ds.plan.step_check --preset tiny --batch 4 --device cpu --steps 1
    python -m vlmo_ds.plan.step_check --preset base --batch auto --gpu h100-80gb --device cuda --dtype bf16

fp32 trains in fp32; bf16 is autocast over fp32 parameters (the planner's "amp" precision: 16 bytes of state per
parameter, as DeepSpeed's bf16 with fp32 gradients). Peak memory is vlmo_ds.plan.measure's MemoryMeter around the
whole run (the model is built inside it), so it is every tensor byte the step holds at its highest.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass

import torch

from vlmo_ds.model.config import PRESETS, ModelConfig, preset
from vlmo_ds.model.flops import image_text_step_flops
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses
from vlmo_ds.parallel.checkpointing import set_activation_checkpointing
from vlmo_ds.plan.host_allocator import freed_memory_kept
from vlmo_ds.plan.measure import MemoryMeter
from vlmo_ds.train.peak import synchronize


def random_batch(cfg: ModelConfig, batch: int, device: torch.device, seed: int = 0) -> dict:
    """B random image-text pairs with 15% of the text positions (and position 1) labelled for MLM."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, cfg.max_text_len), generator=g)
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, generator=g) < 0.15
    picked[:, 1] = True
    labels[picked] = ids[picked]
    out = {"image": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g), "text_ids": ids,
           "text_mask": torch.ones_like(ids), "mlm_ids": ids.masked_fill(picked, 4), "mlm_labels": labels}
    return {k: v.to(device) for k, v in out.items()}


@dataclass
class StepMeasurement:
    seconds: float
    """Mean wall time of a timed step (forward, backward, optimizer step)."""
    peak_bytes: int
    """The highest tensor memory of the whole run, model and optimizer state included."""
    flops: int
    """Model FLOPs of one step (vlmo_ds.model.flops)."""


def measure_step(cfg: ModelConfig, batch: int, device: torch.device | str = "cpu", dtype: str = "fp32",
                 checkpointing: bool = False, steps: int = 2, warmup: int = 1,
                 track_memory: bool = True) -> StepMeasurement:
    """Build the model and AdamW, run `warmup` then `steps` steps on one random batch; time the last `steps`.

    track_memory=False on CPU times the step without the meter (its dispatch mode costs time per op); peak_bytes is
    then 0. On CUDA the meter reads the allocator's statistics and costs nothing. On CPU freed memory is kept for
    reuse, as torch's CUDA caching allocator keeps it (vlmo_ds.plan.host_allocator)."""
    device = torch.device(device)
    torch.manual_seed(0)
    meter = MemoryMeter(device) if track_memory or device.type == "cuda" else None
    with freed_memory_kept(), meter or contextlib.nullcontext():
        model = VLMo(cfg).to(device).train()
        set_activation_checkpointing(model, 1 if checkpointing else 0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        data = random_batch(cfg, batch, device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

        def step(seed: int) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = image_text_losses(model, data, LossWeights(), seed)["loss"]
            loss.backward()
            optimizer.step()

        for i in range(warmup):
            step(i)
        synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            step(warmup + i)
        synchronize(device)
        seconds = (time.perf_counter() - start) / steps
    return StepMeasurement(seconds, meter.peak if meter else 0, image_text_step_flops(cfg, batch))


def main(argv: list[str] | None = None) -> None:
    from vlmo_ds.model.attention import kernel_for
    from vlmo_ds.plan.gpus import GPUS, cpu_machine
    from vlmo_ds.plan.layouts import single_process_estimate

    p = argparse.ArgumentParser(prog="python -m vlmo_ds.plan.step_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", default="4", help="pairs per step, or auto: the largest the planner fits on --gpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="GPU kind the prediction is for")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    cfg = preset(args.preset)
    precision = "amp" if args.dtype == "bf16" else "fp32"
    gpu = GPUS[args.gpu]
    if args.batch == "auto":
        batch = single_process_estimate(cfg, gpu, precision, args.checkpointing, None).micro_batch
    else:
        batch = int(args.batch)
    predicted = single_process_estimate(cfg, gpu, precision, args.checkpointing, batch)
    got = measure_step(cfg, batch, args.device, args.dtype, args.checkpointing, args.steps, args.warmup)
    on_gpu = args.device.startswith("cuda")
    # memory is predicted for the machine it is measured on (CPUs: SDPA's math kernel, no reserve); rates for --gpu
    memory = predicted.memory if on_gpu else single_process_estimate(
        cfg, cpu_machine(1.0, 1.0, 0.0, 2**40), precision, args.checkpointing, batch).memory
    kernel = kernel_for(torch.device(args.device).type)
    rows = [("preset / batch", f"{args.preset} / {batch} pairs, {args.dtype}, checkpointing "
                               f"{'on' if args.checkpointing else 'off'}, {args.device}"),
            ("attention kernel", f"{kernel.name} (sequences padded to a multiple of {kernel.multiple})"),
            ("samples/s", f"{batch / got.seconds:.2f} measured, {batch / predicted.step_seconds:.2f} predicted "
                          f"on {gpu.name}"),
            ("MFU", f"{got.flops / got.seconds / gpu.flops[precision]:.1%} measured, {predicted.mfu:.1%} predicted"
             if on_gpu else f"- (CPU), {predicted.mfu:.1%} predicted on {gpu.name}"),
            ("peak memory", f"{got.peak_bytes / 2**30:.2f} GiB measured, "
                            f"{(memory.total - memory.reserve) / 2**30:.2f} GiB predicted (tensors)")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
