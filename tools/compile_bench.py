#!/usr/bin/env python
"""Eager against compiled MoME blocks (parallel.compile_blocks), in one process: the image-text pre-training step
(ITC, ITM with hard negatives, MLM; forward + backward) of two copies of one model, one with every block compiled
(vlmo_ds.parallel.compile.compile_blocks), timed in interleaved repetitions after warm-up steps that compile; prints
the seconds per step of each, their ratio, the compile time and the largest loss difference.

    python tools/compile_bench.py --preset tiny --batch 8
    python tools/compile_bench.py --preset base --batch 2 --reps 3
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlmo_ds.plan.step_check import random_batch  # noqa: E402
from vlmo_ds.model.config import PRESETS, preset  # noqa: E402
from vlmo_ds.model.vlmo import VLMo  # noqa: E402
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses  # noqa: E402
from vlmo_ds.parallel.compile import compile_blocks  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8, help="pairs per step (default: 8)")
    p.add_argument("--reps", type=int, default=3, help="timed steps of each, interleaved (default: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first; compiling happens here")
    args = p.parse_args(argv)
    torch._inductor.config.fallback_random = True  # the same drop-path draws, so that the losses compare
    cfg = preset(args.preset)
    torch.manual_seed(0)
    eager = VLMo(cfg).train()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    batch = random_batch(cfg, args.batch, torch.device("cpu"))

    def step(model, seed: int) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        torch.manual_seed(seed)
        out = image_text_losses(model, batch, LossWeights(), seed)
        out["loss"].backward()
        return time.perf_counter() - start, out["loss"].item()

    start = time.perf_counter()
    for i in range(args.warmup):
        step(compiled, i)
    compile_seconds = time.perf_counter() - start
    for i in range(args.warmup):
        step(eager, i)
    times = {"eager": [], "compiled": []}
    gap = 0.0
    for i in range(args.reps):
        seed = args.warmup + i
        (t_e, loss_e), (t_c, loss_c) = step(eager, seed), step(compiled, seed)
        times["eager"].append(t_e)
        times["compiled"].append(t_c)
        gap = max(gap, abs(loss_e - loss_c))
    e, c = (sum(times[k]) / args.reps for k in ("eager", "compiled"))
    params = sum(p.numel() for p in eager.parameters())
    print(f"{args.preset} ({params / 1e6:.1f}M parameters), batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.reps} interleaved steps each")
    print(f"eager     {e:8.3f} s/step  ({', '.join(f'{t:.3f}' for t in times['eager'])})")
    print(f"compiled  {c:8.3f} s/step  ({', '.join(f'{t:.3f}' for t in times['compiled'])}); "
          f"warm-up with compilation {compile_seconds:.1f} s")
    print(f"eager / compiled  {e / c:.3f}x   largest loss difference {gap:.2e}")


if __name__ == "__main__":
    main()
