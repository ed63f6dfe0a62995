"""A consolidated model -> a checkpoint that a run of another layout (TP x PP x DP, ZeRO stage) resumes from.

The target layout's own DeepSpeed engines write it: one CPU process per target rank (gloo), each building its shard
as the trainer does (TensorParallelLayers, PipelineStage, the same AdamW groups), filling it exactly
(vlmo_ds.ckpt.engine_state) and saving through vlmo_ds.train.checkpoint.save. DeepSpeed's files are then its own
for that layout, whatever ZeRO stage or precision; the price is one process per target rank on this machine (each
holding its shard's weights and Adam state in float32; run it where the memory is, e.g. inside a Slurm allocation).

What is kept, per change (`describe_plan` prints it):
    weights                 exact (slicing and concatenation only)
    AdamW (moments, step)   exact across DP, ZeRO, TP and PP changes: the moments have their parameter's shape and
                            are cut like it; hyper-parameters (betas, eps, weight decay per group) as saved.
                            A source without optimizer state gives a fresh AdamW with the recipe defaults.
    loader position         kept per data-parallel rank when DP is unchanged (every TP/PP rank of a replica reads
                            the replica's position); with another DP the saved positions do not apply (they are per
                            rank and rank count): the rank files say so (loader null) and the resumed stage starts
                            its data order afresh from that step
    RNG states              those of the source rank with the same data-parallel index (index mod the old DP)
    trainer.json            the source's, with the new "layout" and "model" and a "resharded" note
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from vlmo_ds.ckpt import consolidated
from vlmo_ds.ckpt.consolidated import Consolidated
from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.ckpt.layout import Layout
from vlmo_ds.ckpt.safe_read import read_json
from vlmo_ds.ckpt.safe_write import OutDir, check_name
from vlmo_ds.config.groups import expand, group_of
from vlmo_ds.parallel.env_readers import free_port
from vlmo_ds.parallel.mpu import check_layout
from vlmo_ds.train.checkpoint import STEP_DIR, TRAINER_FILE, root_of
from vlmo_ds.train.stage_record import RECORD_FILE, STAGES_DIR, WEIGHTS_FILE

log = logging.getLogger(__name__)

WORK_DIR = ".reshard-input"
DROPPED_DS_KEYS = ("offload_optimizer", "offload_param")


@dataclass
class Plan:
    """What a reshard writes, decided before any process starts."""

    target: Layout
    precision: str
    ds_config: dict[str, Any]
    step: int
    trainer: dict[str, Any]
    optimizer: str
    """"carried" or "fresh"."""
    data_order: str
    """"kept" (per-DP-rank loader positions) or "restarted"."""
    trainable: list[str]
    """The parameters the target's optimizer steps."""
    rank_sources: dict[int, int | None]
    """Target global rank -> the source global rank whose loader / RNG file it takes (None: none)."""


def _ds_config(state: Consolidated, target: Layout, precision: str, ds_json: dict[str, Any] | None) -> dict:
    base = copy.deepcopy(ds_json if ds_json is not None else state.ds_config or {})
    micro = int(base.get("train_micro_batch_size_per_gpu", 1))
    accumulation = int(base.get("gradient_accumulation_steps", 1))
    zero = {k: v for k, v in (base.get("zero_optimization") or {}).items() if k not in DROPPED_DS_KEYS}
    base.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation,
                train_batch_size=micro * accumulation * target.data, steps_per_print=10**9,
                zero_optimization=zero | {"stage": target.zero_stage},
                bf16={**(base.get("bf16") or {}), "enabled": precision == "bf16"})
    base.pop("bfloat16", None)
    return base


def trainable_names(state: Consolidated, groups: list[str] | None) -> list[str]:
    """The parameters the target's optimizer steps: those with AdamW state; without state, the stage's trainable
    `groups` (vlmo_ds.config.groups names) or, if not given, every parameter."""
    if state.exp_avg:
        if groups is not None and set(state.trainable) != {n for n in state.weights if group_of(n) in expand(groups)}:
            raise CheckpointError(f"--trainable {','.join(groups)} differs from the parameters that have optimizer "
                                  f"state in {state.source}; leave --trainable out (it is only for sources without "
                                  "optimizer state)")
        return state.trainable
    wanted = expand(groups) if groups is not None else None
    return [n for n in state.weights if wanted is None or group_of(n) in wanted]


def trainable_groups(state: Consolidated, names: list[str]) -> list[str]:
    """The groups whose parameters train: what trainer.json's "trainable" names, so that a ZeRO 0 optimizer (which
    stores no names) can be matched when the checkpoint is read again."""
    groups = sorted({group_of(n) for n in names} - {None})
    if {n for n in state.weights if group_of(n) in groups} != set(names):
        raise CheckpointError(f"{state.source}: the parameters with optimizer state are not whole groups of "
                              "vlmo_ds.config.groups; this checkpoint was not made by a vlmo_ds stage")
    return groups


def make_plan(state: Consolidated, target: Layout, precision: str | None = None,
              ds_json: dict[str, Any] | None = None, groups: list[str] | None = None) -> Plan:
    if "step" not in state.trainer:
        raise CheckpointError(f"{state.source} holds weights without a training position (no trainer step); start a "
                              "stage from it with the stage's init_from instead of resharding")
    try:
        check_layout(target.world, target.tensor, target.pipeline, target.zero_stage, state.cfg)
    except ValueError as err:
        raise CheckpointError(f"target layout {target}: {err}") from None
    precision = precision or state.precision or "fp32"
    source = state.layout
    same_data = source is not None and source.data == target.data and bool(state.rank_files)
    rank_sources: dict[int, int | None] = {}
    for rank in range(target.world):
        _, dp, _ = target.coords(rank)
        found = source.global_rank(0, dp % source.data, 0) if source is not None else None
        rank_sources[rank] = found if found in state.rank_files else None
    trainer = dict(state.trainer) | {
        "layout": target.as_dict(), "model": dataclasses.asdict(state.cfg),
        "trainable": trainable_groups(state, trainable_names(state, groups)),
        "resharded": {"from": source.as_dict() if source else None, "source": state.source,
                      "optimizer": "carried" if state.exp_avg else "fresh",
                      "data_order": "kept" if same_data else "restarted"}}
    return Plan(target, precision, _ds_config(state, target, precision, ds_json), int(state.trainer["step"]),
                trainer, trainer["resharded"]["optimizer"], trainer["resharded"]["data_order"],
                trainable_names(state, groups), rank_sources)


def describe_plan(state: Consolidated, plan: Plan) -> list[str]:
    source = state.layout
    optimizer = (f"AdamW moments and step {state.step:g} carried exactly" if plan.optimizer == "carried"
                 else "a fresh AdamW (the source holds no optimizer state)")
    data = ("each data-parallel rank continues from its saved loader position" if plan.data_order == "kept" else
            "restarts at this step (no saved loader positions for this number of data-parallel ranks)")
    return [f"reshard {state.source}: {source or 'consolidated weights'} -> {plan.target}, {plan.precision}, "
            f"step {plan.step} (stage {state.stage})", "weights: exact", f"optimizer: {optimizer}",
            f"data order: {data}"]


def reshard(state: Consolidated, out: str | Path, target: Layout, precision: str | None = None,
            ds_json: dict[str, Any] | None = None, groups: list[str] | None = None, seed: int = 0) -> Path:
    """Write OUT/checkpoints/step_N for `target` (plus the source run's finished stage records); returns the
    checkpoint folder, which train.resume=PATH (or train.run_dir=OUT train.resume=auto) continues from.
    groups: the stage's trainable groups, for a source without optimizer state whose stage freezes parameters."""
    plan = make_plan(state, target, precision, ds_json, groups)
    out_dir = OutDir(out)
    if root_of(out_dir.root).exists():
        raise CheckpointError(f"{root_of(out_dir.root)} exists; reshard into a new or empty folder")
    for line in describe_plan(state, plan):
        log.info(line)
    if plan.data_order == "restarted" and state.rank_files:
        log.warning("the data order restarts at step %d: loader positions are per data-parallel rank and the "
                    "number of ranks changes (%d -> %d)", plan.step, state.layout.data, target.data)
    work = out_dir.path(WORK_DIR)
    consolidated.write_tensors(state, OutDir(work))  # what the target ranks read their shards from
    try:
        job = {"work": str(work), "out": str(out_dir.root), "target": target.as_dict(),
               "model": dataclasses.asdict(state.cfg), "ds_config": plan.ds_config, "step": plan.step,
               "trainer": plan.trainer, "seed": seed, "port": free_port(), "groups": state.groups,
               "adam_step": state.step, "trainable": plan.trainable, "counters": state.counters,
               "rank_files": {r: str(state.rank_files[s]) if s is not None else None
                              for r, s in plan.rank_sources.items()},
               "keep_loader": plan.data_order == "kept"}
        from vlmo_ds.ckpt.reshard_worker import write_rank

        mp.start_processes(write_rank, args=(job,), nprocs=target.world, join=True, start_method="spawn")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        last = str(err).strip().splitlines()[-1]
        raise CheckpointError(f"target rank {err.error_index} of {target} failed: {last}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    folder = root_of(out_dir.root) / f"step_{plan.step:08d}"
    if not (folder / TRAINER_FILE).is_file():
        raise CheckpointError(f"the target ranks did not finish writing {folder}; see the errors above")
    _copy_stage_records(state, out_dir, plan.step)
    log.info("wrote %s: resume with train.resume=%s (or train.run_dir=%s train.resume=auto)", folder, folder,
             out_dir.root)
    return folder


def _copy_stage_records(state: Consolidated, out: OutDir, step: int) -> None:
    """The source run's records of stages finished before the checkpoint's (so that resume=auto in OUT continues
    the checkpoint's stage instead of starting the recipe over)."""
    source = Path(state.source)
    stages = source.parent.parent / STAGES_DIR
    if not (STEP_DIR.match(source.name) and source.parent.name == "checkpoints" and stages.is_dir()):
        log.info("no run folder around %s: stage records not copied; resume with train.resume=PATH", source)
        return
    for record in sorted(stages.iterdir()):
        if not (record / RECORD_FILE).is_file() or record.name == state.stage:
            continue
        if int(read_json(record / RECORD_FILE).get("global_step", step + 1)) > step:
            continue
        name = check_name(record.name, str(stages))
        for file in (WEIGHTS_FILE, RECORD_FILE):
            if (record / file).is_file():
                out.link_or_copy(record / file, STAGES_DIR, name, file)
        log.info("copied the finished stage record %s", name)
