#!/usr/bin/env python
"""Benchmark VLMo's image-text pre-training step (forward + backward of ITC, ITM with hard negatives, MLM).

Single process (the default): samples/s, the achieved FLOP/s (counted analytically from the model's shape), its
ratio to the dense GEMM rate measured in this same process (a machine-independent efficiency figure), peak memory.

    python tools/bench.py --preset tiny --batch 16
    python tools/bench.py --preset base --batch 2 --steps 2
    python tools/bench.py --preset large --batch 32 --device cuda --dtype bf16

Layout (--ranks or --zero-stage, or started by torchrun / the deepspeed launcher): data parallel over the ranks with a
DeepSpeed ZeRO stage; counts every collective of the measured training steps and prints, per step and per rank, the
parameter and gradient traffic beside the least that ZeRO stage must move (vlmo_ds.parallel.traffic), and the
forward passes per training step beside the analytic count (vlmo_ds.parallel.pipeline_passes). Tensor and pipeline
parallel layouts are not measured yet (data parallel only).

    python tools/bench.py --ranks 2 --zero-stage 3 --preset tiny            # spawns 2 processes (gloo on CPU)
    torchrun --nproc_per_node 8 tools/bench.py --zero-stage 3 --preset large --dtype bf16
    python tools/bench.py --ranks 2 --zero-stage 3 --zero stage3_max_reuse_distance=0 --json traffic.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlmo_ds.model.config import PRESETS, preset  # noqa: E402
from vlmo_ds.model.flops import image_text_step_flops  # noqa: E402
from vlmo_ds.model.vlmo import VLMo  # noqa: E402
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses  # noqa: E402
from vlmo_ds.parallel.env_readers import free_port  # noqa: E402
from vlmo_ds.parallel.launch import DistEnv, discover, init_distributed  # noqa: E402
from vlmo_ds.parallel.pipeline_passes import count_block_calls, image_text_passes  # noqa: E402
from vlmo_ds.parallel.traffic import RING_FACTOR, OpCount, count_collectives, zero_minimum  # noqa: E402
from vlmo_ds.train.peak import gemm_rate, synchronize  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default: tiny)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step (layout: per rank and micro-batch; default: 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (single process; a layout uses DeepSpeed's accelerator)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="compute precision (bf16: autocast in one process, DeepSpeed's bf16 in a layout)")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the square GEMM used as the baseline")
    layout = p.add_argument_group("layout (data parallel x ZeRO)")
    layout.add_argument("--ranks", type=int, help="spawn this many processes (not under torchrun / deepspeed)")
    layout.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="ZeRO stage (default: the JSON's)")
    layout.add_argument("--ds-config", help="DeepSpeed JSON (default: ds_configs/zero<stage>_<dtype>.json)")
    layout.add_argument("--zero", action="append", default=[], metavar="KEY=VALUE",
                        help="set zero_optimization.KEY (a JSON value), e.g. stage3_max_reuse_distance=0; repeatable")
    layout.add_argument("--accumulation", type=int, default=1, help="micro-batches per training step (default: 1)")
    layout.add_argument("--json", type=Path, help="also write the layout figures to this JSON file")
    return p.parse_args(argv)


def random_batch(cfg, batch: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
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


def single_process(args: argparse.Namespace) -> None:
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
    print_rows(rows)


def print_rows(rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


GRADIENT_KINDS = ("all_reduce", "reduce_scatter", "reduce")  # how DeepSpeed may reduce gradients (traffic.RING_FACTOR)


def is_layout_run(args: argparse.Namespace) -> bool:
    """A layout benchmark when asked for one, or when a launcher started several processes."""
    asked = args.ranks is not None or args.zero_stage is not None or args.ds_config is not None
    return asked or discover().world_size > 1


def layout_ds_config(args: argparse.Namespace, world: int) -> dict:
    """The DeepSpeed JSON with the batch sizes, stage, precision and --zero settings of this benchmark."""
    from vlmo_ds.config.ds_json import json_zero_stage, read_ds_json, resolve_path

    path = args.ds_config or f"ds_configs/zero{args.zero_stage or 0}_{args.dtype}.json"
    tree = read_ds_json(resolve_path(path, "--ds-config"), "--ds-config")
    zero = dict(tree.get("zero_optimization", {}))
    zero["stage"] = json_zero_stage(tree) if args.zero_stage is None else args.zero_stage
    zero.update(zero_setting(item) for item in args.zero)
    return {**tree, "zero_optimization": zero, "train_micro_batch_size_per_gpu": args.batch,
            "gradient_accumulation_steps": args.accumulation, "train_batch_size": args.batch * args.accumulation * world,
            "gradient_clipping": 1.0, "bf16": {**tree.get("bf16", {}), "enabled": args.dtype == "bf16"}}


def zero_setting(item: str) -> tuple[str, object]:
    """--zero KEY=VALUE as (KEY, the JSON value)."""
    key, sep, text = item.partition("=")
    try:
        if key and sep:
            return key, json.loads(text)
    except json.JSONDecodeError:
        pass
    raise SystemExit(f"bench.py: --zero {item!r} is not KEY=VALUE with a JSON value; "
                     "write e.g. --zero stage3_max_reuse_distance=0")


def run_layout(args: argparse.Namespace) -> None:
    """This process as one rank of a launcher's job, or --ranks processes spawned here (gloo on CPU)."""
    env = discover()
    if env.world_size > 1:
        if args.ranks not in (None, env.world_size):
            raise SystemExit(f"bench.py: --ranks {args.ranks} but the launcher started {env.world_size} processes; "
                             "drop --ranks under torchrun / deepspeed")
        layout_rank(env, args)
        return
    world = 1 if args.ranks is None else args.ranks
    if world < 1:
        raise SystemExit(f"bench.py: --ranks {world} must be at least 1")
    layout_ds_config(args, world)  # a bad JSON or --zero is reported here, once, not by every rank
    import torch.multiprocessing as mp

    mp.start_processes(spawned_rank, args=(world, free_port(), args), nprocs=world, join=True, start_method="spawn")


def spawned_rank(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share this machine's cores
    layout_rank(DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, node_rank=0,
                        master_addr="127.0.0.1", master_port=port, launcher="torchrun"), args)


def layout_rank(env: DistEnv, args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed calls all_gather_into_tensor / reduce_scatter_tensor, deprecated by torch 2.13: a warning per call
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    init_distributed(env, use_deepspeed=True)
    try:
        result = measure_layout(args, env.rank, env.world_size)
        if env.rank == 0:
            print_layout(result)
            if args.json:
                args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    finally:
        dist.destroy_process_group()


def measure_layout(args: argparse.Namespace, rank: int, world: int) -> dict:
    """Warm-up, then the measured steps under the collective and block-call counters; figures per training step."""
    from vlmo_ds.train.engine import build_engine, compute_dtype  # imports DeepSpeed: after DS_ACCELERATOR is set
    from vlmo_ds.train.step import to_device

    cfg = preset(args.preset)
    torch.manual_seed(0)
    engine = build_engine(VLMo(cfg).train(), layout_ds_config(args, world), 1e-4, (0.9, 0.98), 1e-8, 0.01)
    device = torch.device(engine.device)
    micro = [to_device(random_batch(cfg, args.batch, torch.device("cpu"), seed=rank * args.accumulation + i), device,
                       compute_dtype(engine)) for i in range(args.accumulation)]

    def step(seed: int) -> None:
        for batch in micro:  # DeepSpeed steps the optimizer at the last micro-batch only
            out = engine(image_text_losses, batch, LossWeights(), seed, None)
            engine.backward(out["loss"])
            engine.step()

    for i in range(args.warmup):  # ZeRO-3 records its parameter trace in the first step
        step(i)
    dist.barrier()
    start = time.perf_counter()
    with count_collectives() as counter, count_block_calls(engine.module) as calls:
        for i in range(args.steps):
            step(args.warmup + i)
        synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps

    stage = engine.zero_optimization_stage()
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trained)
    persistent = sum(p.ds_numel for p in trained if getattr(p, "ds_persist", False)) if stage == 3 else 0
    minimum = zero_minimum(stage, world, params, trained[0].element_size(), persistent, args.accumulation)

    def per_step(count: OpCount, least: float | None = None) -> dict:
        row = {"calls": count.calls / args.steps, "payload": count.payload / args.steps,
               "counted": count.per_rank / args.steps}
        if least is not None:
            row |= {"minimum": least, "ratio": row["counted"] / least if least else None}
        return row

    other = tuple(kind for kind in RING_FACTOR if kind not in GRADIENT_KINDS + ("all_gather",))
    return {
        "layout": {"data": world, "zero_stage": stage, "dtype": args.dtype, "backend": dist.get_backend(),
                   "device": str(device)},
        "model": {"preset": args.preset, "trainable_parameters": params, "zero3_persistent": persistent,
                  "bytes_per_parameter": trained[0].element_size()},
        "batch": {"per_rank": args.batch, "accumulation": args.accumulation, "steps": args.steps,
                  "warmup": args.warmup},
        "step_seconds": seconds,
        "gradient_reduction": per_step(counter.total(GRADIENT_KINDS, "deepspeed"), minimum["gradient_reduction"]),
        "parameter_all_gather": per_step(counter.total(("all_gather",), "deepspeed"), minimum["parameter_all_gather"]),
        "deepspeed_other": per_step(counter.total(other, "deepspeed")),
        "objectives": per_step(counter.total(via="torch")),
        "ops": [{"op": op, "via": via, "group_size": n, **per_step(count)}
                for (op, via, n), count in sorted(counter.ops.items())],
        "forward_passes": {"counted": sum(calls.values()) / cfg.depth / args.steps,
                           "analytic": image_text_passes(cfg.depth, cfg.vlffn_start) * args.accumulation},
    }


def print_layout(r: dict) -> None:
    lay, model, batch = r["layout"], r["model"], r["batch"]
    kept = f"; ZeRO-3 keeps {model['zero3_persistent']:,} whole" if lay["zero_stage"] == 3 else ""
    print_rows([("layout", f"DP {lay['data']} x ZeRO-{lay['zero_stage']}, {lay['dtype']}, {lay['backend']} on "
                           f"{lay['device']}"),
                ("model", f"{model['preset']}: {model['trainable_parameters']:,} trainable parameters x "
                          f"{model['bytes_per_parameter']} B{kept}"),
                ("batch", f"{batch['per_rank']} pairs per rank x {batch['accumulation']} micro-batches; "
                          f"{batch['steps']} measured steps after {batch['warmup']} warm-up"),
                ("step time", f"{r['step_seconds']:.3f} s"),
                ("forward passes", f"{r['forward_passes']['counted']:.2f} per step counted, "
                                   f"{r['forward_passes']['analytic']:.2f} analytic")])
    print(f"\nper training step, per rank: bytes one rank sends in a ring algorithm; minimum: the least ZeRO-"
          f"{lay['zero_stage']} moves\n(vlmo_ds/parallel/traffic.py: one forward pass; ZeRO-3 gathering for it and again for backward)")
    print(f"{'':<30}{'counted':>14}{'minimum':>14}{'ratio':>8}{'calls':>8}")
    for key, label in (("gradient_reduction", "gradient reduction"), ("parameter_all_gather", "parameter all-gather"),
                       ("deepspeed_other", "other DeepSpeed collectives"), ("objectives", "objectives' collectives")):
        row = r[key]
        least = f"{row['minimum']:>14,.0f}" if "minimum" in row else f"{'-':>14}"
        ratio = f"{row['ratio']:>8.3f}" if row.get("ratio") is not None else f"{'-':>8}"
        print(f"{label:<30}{row['counted']:>14,.0f}{least}{ratio}{row['calls']:>8g}")
    print(f"\n{'collective':<24}{'via':<11}{'group':>6}{'calls':>8}{'payload B':>14}{'B per rank':>14}")
    for op in r["ops"]:
        print(f"{op['op']:<24}{op['via']:<11}{op['group_size']:>6}{op['calls']:>8g}{op['payload']:>14,.0f}"
              f"{op['counted']:>14,.0f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if is_layout_run(args):
        from vlmo_ds.config.errors import ConfigError

        try:
            run_layout(args)
        except ConfigError as err:  # a DeepSpeed JSON problem: its one line names the fix
            raise SystemExit(f"bench.py: {err}") from None
    else:
        single_process(args)


if __name__ == "__main__":
    main()
