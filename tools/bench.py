#!/usr/bin/env python
"""Benchmark one VLMo image-text pre-training step (forward + backward of ITC, ITM with hard negatives, MLM).

Prints samples/s, the achieved FLOP/s (counted analytically from the model's shape), its ratio to the dense fp32 GEMM
rate measured in this same process (a machine-independent efficiency figure), and peak memory.

    python tools/bench.py --preset tiny --batch 16
    python tools/bench.py --preset base --batch 2 --steps 2
    python tools/bench.py --preset large --batch 32 --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlmo_ds.model.config import PRESETS, preset  # noqa: E402
from vlmo_ds.model.flops import image_text_step_flops  # noqa: E402
from vlmo_ds.model.vlmo import VLMo  # noqa: E402
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses  # noqa: E402
from vlmo_ds.train.peak import gemm_rate, synchronize  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default: tiny)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step (default: 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute precision (bf16 = autocast)")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the square GEMM used as the baseline")
    return p.parse_args(argv)


def random_batch(cfg, batch: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (batch, cfg.max_text_len), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, generator=g) < 0.15
    picked[:, 1] = True
    labels[picked] = ids[picked]
    out = {"image": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g), "text_ids": ids,
           "text_mask": mask, "mlm_ids": ids.masked_fill(picked, 4), "mlm_labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = VLMo(cfg).to(device).train()
    batch = random_batch(cfg, args.batch, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(seed: int) -> float:
        model.zero_grad(set_to_none=True)
        with autocast:
            out = image_text_losses(model, batch, LossWeights(), seed)
        out["loss"].backward()
        return out["loss"].item()

    for i in range(args.warmup):
        step(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    flops = image_text_step_flops(cfg, args.batch)
    gemm_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    baseline = gemm_rate(args.gemm_size, device, gemm_dtype)
    params = sum(p.numel() for p in model.parameters())
    rows = [("preset", f"{args.preset} ({params / 1e6:.1f}M parameters)"), ("device / dtype", f"{device} / {args.dtype}"),
            ("batch", args.batch), ("step time", f"{seconds:.3f} s"), ("samples/s", f"{args.batch / seconds:.2f}"),
            ("FLOP per step", f"{flops / 1e9:.2f} GFLOP"), ("achieved", f"{flops / seconds / 1e9:.2f} GFLOP/s"),
            (f"{args.dtype} GEMM {args.gemm_size}^3", f"{baseline / 1e9:.2f} GFLOP/s"),
            ("ratio to GEMM", f"{flops / seconds / baseline:.3f}"), ("peak memory", f"{peak_memory_mib(device):.0f} MiB")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
