#!/usr/bin/env python
"""Benchmark VLMo's image-text pre-training step (forward + backward of ITC, ITM with hard negatives, MLM).

Single process (the default): samples/s, the achieved FLOP/s (counted analytically from the model's shape), its
ratio to the dense GEMM rate measured in this same process (a machine-independent efficiency figure), the attention
kernel, peak memory, and the memory of a training step split into parameters, gradients, AdamW state and
activations (the step's peak less the other three; vlmo_ds.plan.measure.MemoryMeter, on CPU live tensor bytes).

    python tools/bench.py --preset tiny --batch 16
    python tools/bench.py --preset base --batch 2 --steps 2
    python tools/bench.py --preset base --batch 8 --steps 1 --warmup 0 --activation-checkpointing
    python tools/bench.py --preset large --batch 32 --device cuda --dtype bf16

Layout (--ranks, --tensor, --pipeline or --zero-stage, or started by torchrun / the deepspeed launcher): tensor x
pipeline x data parallel with a DeepSpeed ZeRO stage, each rank's module built by the trainer's own layout code
(vlmo_ds.train.layout: place, rank_module, engine_config, the pipelined step). Every collective of the measured
training steps is counted, by the kind of its process group (megatron-core's tensor, pipeline, data and model groups),
and the bench prints per step, as the mean over the ranks, the bytes each kind moves beside the least it must move
(vlmo_ds.parallel.traffic: ZeRO's gradient and parameter traffic over the data-parallel group, the tensor-parallel
activation all-reduces, the pipeline's point-to-point sends), and the forward passes per training step beside the
analytic count (vlmo_ds.parallel.pipeline_passes).

    python tools/bench.py --ranks 2 --zero-stage 3 --preset tiny            # spawns 2 processes (gloo on CPU)
    python tools/bench.py --ranks 4 --tensor 2 --zero-stage 3
    python tools/bench.py --ranks 4 --tensor 2 --pipeline 2 --zero-stage 1 --cpu-pipeline   # CPU test mode
    torchrun --nproc_per_node 8 tools/bench.py --tensor 2 --pipeline 2 --zero-stage 1 --preset large --dtype bf16
    python tools/bench.py --ranks 2 --zero-stage 3 --zero stage3_max_reuse_distance=0 --json traffic.json

Pipeline stages run megatron-core's schedules, which need CUDA. --cpu-pipeline is a CPU test mode: it installs the
CPU stand-ins of tests/megatron_cpu.py (for megatron's CUDA-only calls) in every rank, so that pipeline layouts can be
measured with gloo on a machine without GPUs; it is refused where CUDA is available, where the real path runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from vlmo_ds.config.schema import ModelSection, OptimSection, ParallelSection, RunConfig, StageConfig  # noqa: E402
from vlmo_ds.model.config import PRESETS, preset  # noqa: E402
from vlmo_ds.model.flops import image_text_step_flops  # noqa: E402
from vlmo_ds.model.vlmo import VLMo  # noqa: E402
from vlmo_ds.model.attention import kernel_for  # noqa: E402
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses  # noqa: E402
from vlmo_ds.parallel.checkpointing import set_activation_checkpointing  # noqa: E402
from vlmo_ds.parallel.env_readers import free_port  # noqa: E402
from vlmo_ds.parallel.launch import DistEnv, discover, init_distributed, leave_spawned_rank  # noqa: E402
from vlmo_ds.parallel.layout_rules import check_layout  # noqa: E402
from vlmo_ds.parallel.pipeline_passes import count_block_calls, image_text_passes  # noqa: E402
from vlmo_ds.plan.measure import MemoryMeter  # noqa: E402
from vlmo_ds.plan.step_check import random_batch  # noqa: E402
from vlmo_ds.parallel.traffic import (ImageTextShape, OpCount, TrafficCounter, count_collectives,  # noqa: E402
                                      pipeline_p2p, tensor_parallel_all_reduce, zero_minimum)
from vlmo_ds.train.peak import gemm_rate, synchronize  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default: tiny)")
    p.add_argument("--batch", type=int, default=8,
                   help="pairs per step (layout: per data-parallel rank and micro-batch; default: 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (single process; a layout uses DeepSpeed's accelerator)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="compute precision (bf16: autocast in one process, DeepSpeed's bf16 in a layout)")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the square GEMM used as the baseline")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="single process: checkpoint every MoME block (the memory split shows what it saves)")
    layout = p.add_argument_group("layout (tensor x pipeline x data parallel, ZeRO)")
    layout.add_argument("--ranks", type=int, help="spawn this many processes (not under torchrun / deepspeed)")
    layout.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (megatron-core; default: 1)")
    layout.add_argument("--pipeline", type=int, default=1,
                        help="pipeline stages (megatron-core's 1F1B; ZeRO 0-1 only; needs CUDA or --cpu-pipeline)")
    layout.add_argument("--cpu-pipeline", action="store_true",
                        help="CPU test mode: install tests/megatron_cpu.py's stand-ins for megatron's CUDA calls so "
                             "that --pipeline runs on gloo without GPUs (refused where CUDA is available)")
    layout.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="ZeRO stage (default: the JSON's)")
    layout.add_argument("--ds-config", help="DeepSpeed JSON (default: ds_configs/zero<stage>_<dtype>.json)")
    layout.add_argument("--zero", action="append", default=[], metavar="KEY=VALUE",
                        help="set zero_optimization.KEY (a JSON value), e.g. stage3_max_reuse_distance=0; repeatable")
    layout.add_argument("--accumulation", type=int, default=1, help="micro-batches per training step (default: 1)")
    layout.add_argument("--json", type=Path, help="also write the layout figures to this JSON file")
    return p.parse_args(argv)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def single_process(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = VLMo(cfg).to(device).train()
    if args.activation_checkpointing:
        set_activation_checkpointing(model, 1)
    batch = random_batch(cfg, args.batch, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(seed: int) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with autocast:
            out = image_text_losses(model, batch, LossWeights(), seed)
        out["loss"].backward()
        return out["loss"].detach()

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
            ("batch", args.batch),
            ("activation checkpointing", "every block" if args.activation_checkpointing else "off"),
            ("attention kernel", kernel_for(device.type).name),
            ("step time", f"{seconds:.3f} s"), ("samples/s", f"{args.batch / seconds:.2f}"),
            ("FLOP per step", f"{flops / 1e9:.2f} GFLOP"), ("achieved", f"{flops / seconds / 1e9:.2f} GFLOP/s"),
            (f"{args.dtype} GEMM {args.gemm_size}^3", f"{baseline / 1e9:.2f} GFLOP/s"),
            ("ratio to GEMM", f"{flops / seconds / baseline:.3f}"), ("peak memory", f"{peak_memory_mib(device):.0f} MiB")]
    split = memory_split(model, step, device)
    rows += [(f"memory: {key}", f"{value:,} B ({value / 2**20:,.0f} MiB)") for key, value in split.items()]
    print_rows(rows)


def memory_split(model: torch.nn.Module, step, device: torch.device) -> dict[str, int]:
    """Bytes of one training step: parameters, gradients, AdamW state, and activations = the step's peak less those
    three, measured by vlmo_ds.plan.measure.MemoryMeter (CUDA: the allocator's peak; CPU: live tensor storage).
    Parameters and optimizer state exist before the measured step (a first step and an optimizer step make them);
    gradients are made during it (set to None before, as in training), so they are in the meter's peak."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    step(0)
    optimizer.step()
    synchronize(device)
    with MemoryMeter(device) as meter:
        step(1)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    split = {"parameters": parameters, "gradients": gradients, "optimizer state": state,
             "activations": meter.peak - gradients}
    return split | {"peak": sum(split.values())}


def print_rows(rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


GRADIENT_KINDS = ("all_reduce", "reduce_scatter", "reduce")  # how DeepSpeed may reduce gradients (traffic.RING_FACTOR)
FLAGS = {"parallel.tensor": "--tensor", "parallel.pipeline": "--pipeline", "parallel.zero_stage": "--zero-stage"}


def is_layout_run(args: argparse.Namespace) -> bool:
    """A layout benchmark when asked for one, or when a launcher started several processes."""
    asked = args.ranks is not None or args.zero_stage is not None or args.ds_config is not None
    return asked or args.tensor > 1 or args.pipeline > 1 or args.cpu_pipeline or discover().world_size > 1


def base_ds_config(args: argparse.Namespace) -> dict:
    """The DeepSpeed JSON with the stage, precision, clipping and --zero settings of this benchmark, and the
    preset's derived settings where neither sets a key (as deepspeed_config() does for a run)."""
    from vlmo_ds.config.ds_json import json_zero_stage, read_ds_json, resolve_path
    from vlmo_ds.config.zero_settings import with_zero_settings, zero_settings

    path = args.ds_config or f"ds_configs/zero{args.zero_stage or 0}_{args.dtype}.json"
    tree = read_ds_json(resolve_path(path, "--ds-config"), "--ds-config")
    zero = dict(tree.get("zero_optimization", {}))
    zero["stage"] = json_zero_stage(tree) if args.zero_stage is None else args.zero_stage
    zero.update(zero_setting(item) for item in args.zero)
    tree = {**tree, "zero_optimization": zero, "gradient_clipping": 1.0,
            "bf16": {**tree.get("bf16", {}), "enabled": args.dtype == "bf16"}}
    derived = zero_settings(preset(args.preset), zero["stage"], args.tensor * args.pipeline, args.dtype)
    return with_zero_settings(tree, derived)


def layout_ds_config(args: argparse.Namespace, dp: int) -> dict:
    """base_ds_config with the batch sizes of `dp` data-parallel ranks (before layout.engine_config, which turns
    overlap_comm off under pipeline parallelism)."""
    tree = base_ds_config(args)
    return {**tree, "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": args.accumulation,
            "train_batch_size": args.batch * args.accumulation * dp}


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


def check_bench_layout(args: argparse.Namespace, world: int) -> None:
    """The trainer's layout rules and the pipeline's device need, as one line naming this tool's flags."""
    stage = base_ds_config(args)["zero_optimization"]["stage"]
    try:
        check_layout(world, args.tensor, args.pipeline, stage, preset(args.preset), grad_clip=1.0)
    except ValueError as err:
        message = str(err)
        for key, flag in FLAGS.items():
            message = message.replace(key, flag)
        raise SystemExit(f"bench.py: {message}") from None
    if args.cpu_pipeline and torch.cuda.is_available():
        raise SystemExit("bench.py: --cpu-pipeline is the CPU test mode, and CUDA is available here; drop "
                         "--cpu-pipeline to measure megatron-core's real pipeline path")
    if args.pipeline > 1 and not torch.cuda.is_available() and not args.cpu_pipeline:
        raise SystemExit(f"bench.py: --pipeline {args.pipeline} needs CUDA devices (megatron-core's pipeline schedules "
                         "allocate on the GPU); on CPU add --cpu-pipeline (CPU test mode) or use --pipeline 1")


def run_layout(args: argparse.Namespace) -> None:
    """This process as one rank of a launcher's job, or --ranks processes spawned here (gloo on CPU)."""
    env = discover()
    if env.world_size > 1:
        if args.ranks not in (None, env.world_size):
            raise SystemExit(f"bench.py: --ranks {args.ranks} but the launcher started {env.world_size} processes; "
                             "drop --ranks under torchrun / deepspeed")
        check_bench_layout(args, env.world_size)
        layout_rank(env, args)
        return
    world = 1 if args.ranks is None else args.ranks
    if world < 1:
        raise SystemExit(f"bench.py: --ranks {world} must be at least 1")
    check_bench_layout(args, world)  # a bad layout, JSON or --zero is reported here, once, not by every rank
    import torch.multiprocessing as mp

    mp.start_processes(spawned_rank, args=(world, free_port(), args), nprocs=world, join=True, start_method="spawn")


def spawned_rank(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share this machine's cores
    layout_rank(DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, node_rank=0,
                        master_addr="127.0.0.1", master_port=port, launcher="torchrun"), args)
    leave_spawned_rank()


def layout_rank(env: DistEnv, args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed calls all_gather_into_tensor / reduce_scatter_tensor, deprecated by torch 2.13: a warning per call
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    warnings.filterwarnings("ignore", "(Transformer Engine and Apex are|Apex is) not installed", UserWarning)  # megatron's
    if not torch.cuda.is_available():  # megatron's advice for overlapping CUDA streams
        warnings.filterwarnings("ignore", ".*CUDA_DEVICE_MAX_CONNECTIONS", UserWarning)
    if args.cpu_pipeline:  # CPU test mode (asked for, and refused under CUDA by check_bench_layout)
        sys.path.insert(0, str(REPO / "tests"))
        from megatron_cpu import allow_cpu_pipeline

        allow_cpu_pipeline()
    init_distributed(env, use_deepspeed=True)
    try:
        result = measure_layout(args, env)
        if result is not None:
            print_layout(result)
            if args.json:
                args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    finally:
        dist.destroy_process_group()


def bench_run_config(args: argparse.Namespace, zero_stage: int) -> RunConfig:
    """What vlmo_ds.train.layout reads of a run: the layout, clipping at 1 (as the JSON), one image-text stage."""
    stage = StageConfig(name="image_text", kind="image_text", data=(), steps=args.steps,
                        loss_weights=asdict(LossWeights()))
    return RunConfig(run_dir=".", model=ModelSection(preset=args.preset), tokenizer="", deepspeed="",
                     parallel=ParallelSection(tensor=args.tensor, pipeline=args.pipeline, zero_stage=zero_stage),
                     optim=OptimSection(grad_clip=1.0), stages=(stage,))


def itm_negative_bytes(batch: dict, embeds: bool) -> int:
    """Bytes of the ITM negatives one rank uses per micro-batch: B images and B texts (ids and key mask) where the
    rank embeds them (one process, or the first pipeline stage), B key masks on later stages
    (vlmo_ds.objectives.negatives; its all_to_all moves the rows of these a rank does not hold itself)."""
    mask = batch["text_mask"]
    used = mask.numel() * mask.element_size()
    if embeds:
        used += sum(batch[key].numel() * batch[key].element_size() for key in ("image", "text_ids"))
    return used


def group_kinds(where) -> dict:
    """The layout's process groups by kind, in order of precedence for copies with the same ranks."""
    if where.mpu is None:
        return {"data": None}  # every rank holds the whole model: the world is the data-parallel group
    return {"tensor": where.tp_group, "pipeline": where.mpu.get_pipeline_model_parallel_group(),
            "data": where.dp_group, "model": where.mp_group, "world": None}


def measure_layout(args: argparse.Namespace, env: DistEnv) -> dict | None:
    """Warm-up, then the measured steps under the collective and block-call counters; on rank 0 the figures per
    training step, as the mean over all ranks (None on the other ranks)."""
    from vlmo_ds.train import layout  # imports DeepSpeed: after DS_ACCELERATOR is set
    from vlmo_ds.train.engine import build_engine, compute_dtype
    from vlmo_ds.train.stages import loss_function
    from vlmo_ds.parallel.pipeline_stage import split_blocks
    from vlmo_ds.parallel.device import device_of
    from vlmo_ds.train.step import to_device

    cfg = preset(args.preset)
    zero_stage = base_ds_config(args)["zero_optimization"]["stage"]
    run_cfg = bench_run_config(args, zero_stage)
    where = layout.place(run_cfg, env, cfg)
    lay = where.layout
    ds_config = layout.engine_config(layout_ds_config(args, lay.data), where, args.batch, args.accumulation)
    torch.manual_seed(0)
    module = layout.rank_module(VLMo(cfg).train(), where, ds_config, device_of(env))
    engine = build_engine(module, ds_config, 1e-4, (0.9, 0.98), 1e-8, 0.01, mpu=where.mpu)
    device, stage = torch.device(engine.device), run_cfg.stages[0]
    raw = [random_batch(cfg, args.batch, torch.device("cpu"), seed=where.dp_rank * args.accumulation + i)
           for i in range(args.accumulation)]  # every tensor / pipeline rank of a replica reads the same batch
    micro = [to_device(batch, device, compute_dtype(engine)) for batch in raw]
    loss_fn = loss_function(stage, False, where.tp_group)

    def step(seed: int) -> None:
        if where.pipelined:  # the schedule runs every micro-batch; DeepSpeed averages and steps once
            layout.pipeline_step(engine, stage, micro, [seed] * len(micro), where, False)
            engine.step()
            return
        for batch in micro:  # DeepSpeed steps the optimizer at the last micro-batch only
            out = engine(loss_fn, batch, seed, where.dp_group)
            engine.backward(out["loss"])
            engine.step()

    for i in range(args.warmup):  # ZeRO-3 records its parameter trace in the first step
        step(i)
    dist.barrier()
    start = time.perf_counter()
    with count_collectives(group_kinds(where)) as counter, count_block_calls(engine.module) as calls:
        for i in range(args.steps):
            step(args.warmup + i)
        synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps

    trained = [p for p in engine.module.parameters() if p.requires_grad]
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trained)
    persistent = sum(p.ds_numel for p in trained if getattr(p, "ds_persist", False)) if zero_stage == 3 else 0
    element = trained[0].element_size()
    grad_element = engine.communication_data_type.itemsize  # gradients are reduced in this type (fp32 under bf16)
    starts = [blocks.start for blocks in split_blocks(cfg.depth, lay.pipeline)[1:]]
    shapes = [ImageTextShape(args.batch, cfg.max_text_len, cfg.image_len, cfg.dim, cfg.depth, cfg.vlffn_start,
                             b["mlm_labels"].numel(), element) for b in raw]  # the MLM head scores every text position
    mine = {"counter": counter, "block_calls": sum(calls.values()), "params": params, "persistent": persistent,
            "zero": zero_minimum(zero_stage, lay.data, params, element, persistent, args.accumulation, grad_element),
            "grad_element": grad_element,
            "tensor": sum(tensor_parallel_all_reduce(s, lay.tensor, lay.pipeline)["per_rank"] for s in shapes),
            "pipeline": sum(pipeline_p2p(s, starts)["per_rank"] for s in shapes), "seconds": seconds,
            "itm_exchange": sum(itm_negative_bytes(b, where.pp_rank == 0) for b in micro)}
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    if env.rank != 0:
        return None
    lay_row = {"tensor": lay.tensor, "pipeline": lay.pipeline, "data": lay.data, "zero_stage": zero_stage,
               "dtype": args.dtype, "backend": dist.get_backend(), "device": str(device),
               "cpu_pipeline": args.cpu_pipeline,
               "overlap_comm": bool(ds_config["zero_optimization"].get("overlap_comm", False))}
    return summarise(args, everyone, lay_row, element, {key: ds_config["zero_optimization"].get(key) for key in (
        "reduce_bucket_size", "use_multi_rank_bucket_allreduce", "stage3_prefetch_bucket_size",
        "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_param_persistence_threshold")})


def summarise(args: argparse.Namespace, everyone: list[dict], lay: dict, element: int, zero_keys: dict) -> dict:
    """The figures per training step, as the mean over the ranks' measurements (`everyone`, in rank order)."""
    cfg = preset(args.preset)

    def mean(key: str) -> float:
        return sum(r[key] for r in everyone) / len(everyone)

    traffic = TrafficCounter.mean([r["counter"] for r in everyone])
    zero = {k: sum(r["zero"][k] for r in everyone) / len(everyone) for k in everyone[0]["zero"]}

    def per_step(count: OpCount, least: float | None = None) -> dict:
        row = {"calls": count.calls / args.steps, "payload": count.payload / args.steps,
               "counted": count.per_rank / args.steps}
        if least is not None:
            row |= {"minimum": least, "ratio": row["counted"] / least if least else None}
        return row

    rows = {"gradient_reduction": (traffic.total(GRADIENT_KINDS, "deepspeed", "data"), zero["gradient_reduction"]),
            "parameter_all_gather": (traffic.total(("all_gather",), "deepspeed", "data"),
                                     zero["parameter_all_gather"]),
            "tensor_all_reduce": (traffic.total(("all_reduce",), group="tensor"), mean("tensor")),
            "pipeline_p2p": (traffic.total(("p2p",), group="pipeline"), mean("pipeline")),
            "itm_exchange": (traffic.total(("all_to_all",), group="data"), mean("itm_exchange"))}
    other = traffic.total()
    for count, _ in rows.values():
        other = OpCount(other.calls - count.calls, other.payload - count.payload, other.per_rank - count.per_rank)
    return {
        "layout": lay,
        "model": {"preset": args.preset, "trainable_parameters": mean("params"), "zero3_persistent": mean("persistent"),
                  "bytes_per_parameter": element, "bytes_per_gradient": everyone[0]["grad_element"]},
        "zero_settings": {key: value for key, value in zero_keys.items() if value is not None},
        "batch": {"per_rank": args.batch, "accumulation": args.accumulation, "steps": args.steps,
                  "warmup": args.warmup},
        "step_seconds": max(r["seconds"] for r in everyone),
        **{key: per_step(count, least) for key, (count, least) in rows.items()},
        "other": per_step(other),
        "ops": [{"op": key.op, "via": key.via, "group": key.group, "group_size": key.group_size, **per_step(count)}
                for key, count in sorted(traffic.ops.items())],
        # a replica's block calls are spread over its PP stages, and each of a stage's TP ranks counts them all
        "forward_passes": {"counted": mean("block_calls") * lay["pipeline"] / cfg.depth / args.steps,
                           "analytic": image_text_passes(cfg.depth, cfg.vlffn_start) * args.accumulation},
    }


def print_layout(r: dict) -> None:
    lay, model, batch = r["layout"], r["model"], r["batch"]
    kept = f"; ZeRO-3 keeps {model['zero3_persistent']:,.0f} whole" if lay["zero_stage"] == 3 else ""
    test_mode = ", CPU test mode (tests/megatron_cpu.py)" if lay["cpu_pipeline"] else ""
    overlap = ", overlap_comm off (pipeline)" if lay["pipeline"] > 1 else ""
    print_rows([("layout", f"TP {lay['tensor']} x PP {lay['pipeline']} x DP {lay['data']}, ZeRO-{lay['zero_stage']}, "
                           f"{lay['dtype']}, {lay['backend']} on {lay['device']}{test_mode}{overlap}"),
                ("model", f"{model['preset']}: {model['trainable_parameters']:,.0f} trainable parameters per rank "
                          f"(mean) x {model['bytes_per_parameter']} B, gradients reduced in "
                          f"{model['bytes_per_gradient']} B{kept}"),
                ("ZeRO settings", ", ".join(f"{k}={v}" for k, v in r["zero_settings"].items()) or "-"),
                ("batch", f"{batch['per_rank']} pairs per data-parallel rank x {batch['accumulation']} micro-batches; "
                          f"{batch['steps']} measured steps after {batch['warmup']} warm-up"),
                ("step time", f"{r['step_seconds']:.3f} s"),
                ("forward passes", f"{r['forward_passes']['counted']:.2f} per step counted, "
                                   f"{r['forward_passes']['analytic']:.2f} analytic")])
    print("\nper training step, mean over ranks: bytes one rank sends (ring algorithm; a send counts its bytes); "
          "theory: the least\nthat kind must move (vlmo_ds/parallel/traffic.py; ZeRO: one forward pass, ZeRO-3 "
          "gathering for it and again for backward)")
    print(f"{'group':<10}{'traffic':<28}{'counted':>14}{'theory':>14}{'ratio':>8}{'calls':>8}")
    for key, group, label in (("gradient_reduction", "data", "ZeRO gradient reduction"),
                              ("parameter_all_gather", "data", "ZeRO parameter all-gather"),
                              ("tensor_all_reduce", "tensor", "activation all-reduces"),
                              ("pipeline_p2p", "pipeline", "point-to-point sends"),
                              ("itm_exchange", "data", "ITM image exchange"),
                              ("other", "any", "other collectives")):
        if (group == "tensor" and lay["tensor"] == 1) or (group == "pipeline" and lay["pipeline"] == 1):
            continue
        row = r[key]
        least = f"{row['minimum']:>14,.0f}" if "minimum" in row else f"{'-':>14}"
        ratio = f"{row['ratio']:>8.3f}" if row.get("ratio") is not None else f"{'-':>8}"
        print(f"{group:<10}{label:<28}{row['counted']:>14,.0f}{least}{ratio}{row['calls']:>8g}")
    print(f"\n{'collective':<24}{'via':<11}{'group':<10}{'size':>5}{'calls':>8}{'payload B':>14}{'B per rank':>14}")
    for op in r["ops"]:
        print(f"{op['op']:<24}{op['via']:<11}{op['group']:<10}{op['group_size']:>5}{op['calls']:>8g}"
              f"{op['payload']:>14,.0f}{op['counted']:>14,.0f}")


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
