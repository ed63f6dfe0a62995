"""Plan a recipe's image-text pre-training on a number of GPUs: `python -m vlmo_ds.plan RECIPE --gpus N --gpu KIND`.

Lists the layouts that fit (tensor x pipeline x data parallel, ZeRO stage, activation checkpointing, micro batch x
gradient accumulation over the recipe's global batch), best first (samples/s), each with its memory per rank
broken down and its estimated step time and MFU; then the best layouts that do not fit, with how much they are over.

Memory per rank (GiB): params, grads, optim (Adam moments and bf16's fp32 master weights, partitioned by ZeRO),
act (what the blocks keep for backward), bias (attention index and masks), bucket (ZeRO's communication buffers and
ZeRO-3's gathered parameters), reserve (CUDA context, workspaces, fragmentation). Step time: compute at the GPU's
achievable GEMM rate, memory traffic, per-kernel overhead, and the communication that does not overlap
(vlmo_ds/plan/timing.py). MFU: model FLOPs / (step time x GPUs x datasheet peak). These are estimates: check the
chosen layout with tools/gpu_check.sh on one GPU and tools/bench.py on the real layout.
"""
from __future__ import annotations

import argparse
import sys

from vlmo_ds.config.errors import main_errors
from vlmo_ds.config.load import shipped_recipes
from vlmo_ds.plan import GPUS, plan
from vlmo_ds.plan.estimate import Estimate

GIB = 2**30
COLUMNS = ("params", "grads", "optim", "act", "bias", "bucket", "reserve")


def row(e: Estimate) -> str:
    m, lay = e.memory, e.layout
    parts = (m.parameters, m.gradients, m.optimizer, m.activations, m.attention_bias, m.buckets, m.reserve)
    memory = "".join(f"{v / GIB:>8.1f}" for v in parts)
    fit = f"{m.total / GIB:>7.1f}" + ("" if e.fits else f"  over by {e.over_by / GIB:.1f} GiB")
    return (f"{lay.tensor:>3}{lay.pipeline:>4}{lay.data:>5}{lay.zero_stage:>5} {'on ' if lay.checkpointing else 'off'}"
            f"{lay.micro_batch:>6}{lay.accumulation:>6}{e.step_seconds:>9.3f}{e.samples_per_second:>10.0f}"
            f"{e.mfu:>7.1%}{memory}{fit}")


def header() -> str:
    return (f"{'TP':>3}{'PP':>4}{'DP':>5}{'ZeRO':>5} {'AC ':<3}{'micro':>6}{'accum':>6}{'step s':>9}{'samples/s':>10}"
            f"{'MFU':>7}" + "".join(f"{c:>8}" for c in COLUMNS) + f"{'total':>7}")


@main_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlmo_ds.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help=f"recipe YAML path or shipped name ({', '.join(shipped_recipes())})")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. model.preset=giant train.global_batch=4096")
    p.add_argument("--gpus", type=int, required=True, help="GPUs the run will use")
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="GPU kind (default: h100-80gb)")
    p.add_argument("--top", type=int, default=10, help="fitting layouts shown (default: 10)")
    p.add_argument("--over", type=int, default=3, help="layouts that do not fit shown (default: 3)")
    args = p.parse_intermixed_args(argv)
    if args.gpus < 1:
        raise SystemExit(f"python -m vlmo_ds.plan: --gpus {args.gpus} must be at least 1")
    estimates = plan(args.recipe, args.gpus, args.gpu, args.overrides)
    fitting = [e for e in estimates if e.fits]
    over = [e for e in estimates if not e.fits]
    out = sys.stdout
    if estimates:
        e = estimates[0]
        out.write(f"# {args.recipe} on {args.gpus} x {args.gpu} ({GPUS[args.gpu].hbm_bytes / GIB:.1f} GiB), "
                  f"{e.precision}, global batch {e.layout.micro_batch * e.layout.accumulation * e.layout.data}: "
                  f"{len(fitting)} of {len(estimates)} layouts fit; memory per rank in GiB\n")
    out.write(header() + "\n")
    for e in fitting[: args.top]:
        out.write(row(e) + "\n")
    if not fitting:
        out.write("# no layout fits: add GPUs, or lower train.global_batch\n")
    if over[: args.over]:
        out.write("# closest that do not fit:\n")
        for e in over[: args.over]:
            out.write(row(e) + "\n")


if __name__ == "__main__":
    main()
