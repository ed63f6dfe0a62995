#!/usr/bin/env python
"""vlmo_ds beside the published VLMo implementation: the image-text pre-training step, side by side, one process.

The same work: both models hold the same weights (ours, exported by vlmo_ds.model.published.export_published and
loaded into the published model) and take the same random batch (images at the preset's size, text at its length,
15% of the tokens masked). A step is the forward and backward pass of ITC on both paths (modality experts, VL
experts), ITM with hard negatives (3B fused pairs) and MLM (B fused pairs), no optimizer step: vlmo_ds through
vlmo_ds.objectives.pretrain.image_text_losses, the published code through its own LightningModule.training_step with
its "itc", "itm" and "mlm" tasks. Before timing, both compute ITC and MLM in eval mode: equal losses show the same
model on the same input. After a warm-up step of each, the timed steps are interleaved (ours, published, ours, ...).

Printed per implementation:
- samples/s of every repetition;
- GFLOP per pair, counted by torch's FlopCounterMode during the first warm-up step (model FLOPs: a fused attention
  kernel's backward recomputation is not counted), beside vlmo_ds.model.flops' analytic count of its passes;
- the achieved FLOP/s and its ratio to a dense fp32 GEMM measured in this process;
- how busy the step kept the CPU (process CPU time over wall time and threads: well below 100% means something else
  ran meanwhile; rerun on a quiet machine), the kernel's share, and the fresh memory pages a step touched (what the
  allocator took from the operating system: zeroing them is kernel time);
then the speed ratio vlmo_ds / published (medians of the repetitions), also per FLOP of each one's own work.

The published code comes from a checkout outside this repository; nothing of it is copied here (tools/published_vlmo.py
says how it is run: a gloo group of one process, a timm stand-in, get_device on CPU). To set it up once:

    # microsoft/unilm from GitHub, only its vlmo/ folder is needed (e.g. a sparse checkout of vlmo/)
    git clone --depth 1 --filter=blob:none --sparse https://github.com/microsoft/unilm /opt/unilm
    git -C /opt/unilm sparse-checkout set vlmo
    pip install --no-deps --target /opt/vlmo-site -r tools/published_requirements.txt

    python tools/bench_published.py --published /opt/unilm/vlmo --site /opt/vlmo-site
    python tools/bench_published.py --published /opt/unilm/vlmo --site /opt/vlmo-site --profile 15   # where time goes

Both run in one process whose freed memory is kept for reuse, as torch's CUDA caching allocator keeps it on GPUs
(vlmo_ds.plan.host_allocator: glibc otherwise faults every tensor above 32 MiB in afresh, 1-4 GiB per base step
here, which penalises batched passes on CPUs only); --system-malloc keeps glibc's defaults.

Defaults: preset base, fp32, 2 threads, batch 4, 3 repetitions (about 4 minutes for base on 2 cores; --profile adds 1).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from published_vlmo import (ARCHS, PublishedCodeError, build_published, import_published,  # noqa: E402
                            published_batch, published_losses, published_step, published_step_flops,
                            single_process_group)
from vlmo_ds.model.config import preset  # noqa: E402
from vlmo_ds.model.flops import image_text_step_flops  # noqa: E402
from vlmo_ds.model.published import export_published  # noqa: E402
from vlmo_ds.model.vlmo import VLMo  # noqa: E402
from vlmo_ds.plan.host_allocator import freed_memory_kept  # noqa: E402
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses  # noqa: E402
from vlmo_ds.train.peak import gemm_rate  # noqa: E402

MASK_ID = 103  # BERT uncased [MASK]
IGNORE = -100


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--published", type=Path, required=True,
                   help="the published code: unilm's vlmo/ folder (the one holding the vlmo package), or the unilm "
                        "checkout above it")
    p.add_argument("--site", type=Path,
                   help="folder with the packages the published code imports (pip install --no-deps --target SITE "
                        "-r tools/published_requirements.txt); default: this environment's")
    p.add_argument("--preset", default="base", choices=sorted(ARCHS), help="model size (default: base)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step (default: 4)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps of each, interleaved (default: 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps of each first, interleaved; the first one counts the FLOPs (default: 1)")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the square fp32 GEMM baseline (default: 2048)")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's allocator defaults (fresh pages for every tensor above 32 MiB) instead of keeping "
                        "freed memory for reuse as on GPUs")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one more step of each and print its N top ops by self CPU time")
    args = p.parse_args(argv)
    if args.batch < 2:
        p.error("--batch must be at least 2 (each ITM hard negative is another pair of the batch)")
    for name in ("threads", "repeats", "gemm_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first warm-up step counts the FLOPs)")
    if args.profile < 0:
        p.error("--profile must be 0 (off) or a number of ops")
    return args


def random_batch(cfg, batch: int, seed: int = 0) -> dict:
    """Images, text of random length (padded to max_text_len), 15% of the tokens past [CLS] masked for MLM."""
    g = torch.Generator().manual_seed(seed)
    t = cfg.max_text_len
    lengths = torch.randint(t // 4, t + 1, (batch,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).long()
    ids = torch.randint(MASK_ID + 1, cfg.vocab_size, (batch, t), generator=g) * mask
    picked = (torch.rand(batch, t, generator=g) < 0.15) & mask.bool()
    picked[:, 0], picked[:, 1] = False, True  # never [CLS]; at least one label per row
    return {"image": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g), "text_ids": ids,
            "text_mask": mask, "mlm_ids": ids.masked_fill(picked, MASK_ID),
            "mlm_labels": ids.masked_fill(~picked, IGNORE)}


@dataclass
class Sample:
    """One timed step: wall seconds, the process's CPU seconds over them (all threads; of it in the kernel), and the
    fresh memory pages it touched (minor page faults: memory the allocator took from the OS and handed back)."""

    seconds: float
    cpu: float
    system: float
    fresh_bytes: int


def timed(step) -> Sample:
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    step()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    return Sample(seconds, after.ru_utime - before.ru_utime + system, system,
                  (after.ru_minflt - before.ru_minflt) * resource.getpagesize())


def agreement(ours, theirs, batch: dict, pub_batch: dict) -> str:
    """ITC and MLM losses of both in eval mode (no drop path, no dropout): the same model on the same batch."""
    ours.eval(), theirs.eval()
    with torch.no_grad():
        a = image_text_losses(ours, batch, LossWeights(itm=0.0), 0)
        b = published_losses(theirs, pub_batch)
    ours.train(), theirs.train()
    pub_mlm = b["mlm_loss"] / 0.25  # the published mlm_loss carries its 0.25 weight
    return (f"ITC {a['itc'].item():.5f} vs {b['itc_loss'].item():.5f}, "
            f"MLM {a['mlm'].item():.5f} vs {pub_mlm.item():.5f}")


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile(step, rows: int) -> str:
    """The top `rows` ops of one step by self CPU time, and that time split into GEMMs, attention kernels, the rest."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = prof.key_averages()
    split = {"GEMM": 0.0, "attention kernels": 0.0, "everything else": 0.0}
    for op in ops:
        kind = ("GEMM" if op.key in GEMM_OPS else "attention kernels" if "scaled_dot_product" in op.key
                else "everything else")
        split[kind] += op.self_cpu_time_total / 1e6
    summary = ", ".join(f"{kind} {seconds:.2f} s" for kind, seconds in split.items())
    return f"{ops.table(sort_by='self_cpu_time_total', row_limit=rows)}\nself CPU time: {summary}"


def _attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query, key, value)  # twice the forward, as the unfused (math) backward counts


# torch's counter knows the CUDA attention kernels; these are the CPU ones SDPA may pick
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward}


def counted(step) -> int:
    """The FLOPs a step computes, counted by torch while it runs."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    return counter.get_total_flops()


def report(samples: dict[str, list[Sample]], flops: dict[str, int], analytic: dict[str, int], gemm: float,
           batch: int, threads: int) -> None:
    """One line per implementation, then the speed ratio (medians of the repetitions)."""
    median = {name: statistics.median(s.seconds for s in rows) for name, rows in samples.items()}
    for name, rows in samples.items():
        achieved = flops[name] / median[name]
        busy = [s.cpu / (s.seconds * threads) for s in rows]
        print(f"{name:<10} samples/s {' '.join(f'{batch / s.seconds:.3f}' for s in rows)} | "
              f"{flops[name] / batch / 1e9:.1f} GFLOP per pair ({analytic[name] / batch / 1e9:.1f} analytic) | "
              f"{achieved / 1e9:.1f} GFLOP/s = "
              f"{achieved / gemm:.0%} of the GEMM rate | CPU busy {min(busy):.0%}-{max(busy):.0%} of {threads} "
              f"threads, {statistics.mean(s.system / s.cpu for s in rows):.0%} in the kernel, "
              f"{statistics.mean(s.fresh_bytes for s in rows) / 2**30:.1f} GiB of fresh pages per step")
    ratios = [p.seconds / o.seconds for o, p in zip(samples["vlmo_ds"], samples["published"])]
    overall = median["published"] / median["vlmo_ds"]
    print(f"speed vlmo_ds / published: {overall:.3f}x (per repetition {' '.join(f'{r:.3f}' for r in ratios)}); "
          f"per FLOP of each one's own work {overall * flops['published'] / flops['vlmo_ds']:.3f}x")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.system_malloc:
        return side_by_side(args, kept=False)
    with freed_memory_kept() as kept:
        return side_by_side(args, kept)


def side_by_side(args: argparse.Namespace, kept: bool) -> int:
    """Build both models on the same weights and batch, time them interleaved, print the report (and profiles)."""
    cfg = preset(args.preset)
    try:
        cls = import_published(args.published, args.site)
    except PublishedCodeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    single_process_group()
    torch.manual_seed(0)
    ours = VLMo(cfg).train()
    theirs = build_published(cls, cfg, args.preset, export_published(ours))
    batch = random_batch(cfg, args.batch)
    pub_batch = published_batch(batch)

    def ours_step() -> None:
        image_text_losses(ours, batch, LossWeights(), ours_step.seed)["loss"].backward()
        ours_step.seed += 1
    ours_step.seed = 0

    def theirs_step() -> None:
        published_step(theirs, pub_batch)

    same = agreement(ours, theirs, batch, pub_batch)
    steps = {"vlmo_ds": (ours, ours_step), "published": (theirs, theirs_step)}
    samples: dict[str, list[Sample]] = {name: [] for name in steps}
    gemm_before = gemm_rate(args.gemm_size, torch.device("cpu"), torch.float32)
    flops: dict[str, int] = {}
    for rep in range(args.warmup + args.repeats):  # interleaved; the warm-up steps are not reported
        for name, (model, step) in steps.items():
            model.zero_grad(set_to_none=True)
            if rep == 0:
                flops[name] = counted(step)
            elif rep < args.warmup:
                step()
            else:
                samples[name].append(timed(step))
    # the machine's ceiling: a busy moment can only slow a measurement down
    gemm = max(gemm_before, gemm_rate(args.gemm_size, torch.device("cpu"), torch.float32))
    analytic = {"vlmo_ds": image_text_step_flops(cfg, args.batch),
                "published": published_step_flops(cfg, args.batch)}
    print(f"{args.preset}: fp32, {torch.get_num_threads()} threads, batch {args.batch}, {args.repeats} interleaved "
          f"repetitions after {args.warmup} warm-up step(s) each; torch {torch.__version__}; "
          f"published code {args.published}; freed memory "
          f"{'kept for reuse (as on GPUs)' if kept else 'returned to the system (glibc defaults)'}")
    print(f"same weights, same batch (eval mode, vlmo_ds vs published): {same}")
    print(f"fp32 GEMM {args.gemm_size}^3 in this process: {gemm / 1e9:.1f} GFLOP/s (the faster of two measurements, "
          "before and after the steps)")
    report(samples, flops, analytic, gemm, args.batch, args.threads)
    if args.profile:
        for name, (model, step) in steps.items():
            model.zero_grad(set_to_none=True)
            print(f"\n{name}: top {args.profile} ops by self CPU time, one step\n{profile(step, args.profile)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
