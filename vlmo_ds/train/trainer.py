"""The training entry point: every stage of a recipe in order (vlmo_ds.train.schedule decides which and where each
starts; vlmo_ds.train.stage_loop runs one), handing each stage's final weights to the next, until the ranks agree to
stop early (vlmo_ds.train.preemption: a stop signal or train.deadline_minutes)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.distributed as dist

from vlmo_ds.config import RunConfig, model_config
from vlmo_ds.data.tokenizer import load_tokenizer
from vlmo_ds.parallel.launch import DistEnv
from vlmo_ds.plan.startup import fit_warning
from vlmo_ds.train import checkpoint, layout
from vlmo_ds.train.preemption import Stop, StopSignals, agree_to_stop
from vlmo_ds.train.schedule import clear_stale, plan_run, start_weights
from vlmo_ds.train.stage_loop import RunContext, StageOutcome, StageRunner, step_offset
from vlmo_ds.train.watchdog import Progress
from vlmo_ds.parallel.device import device_of

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    step: int
    """Global steps completed (all stages so far)."""
    final: dict[str, float] | None
    """The last step's data-parallel mean of each loss (None when no step ran)."""
    eval: dict[str, Any] | None
    """The last retrieval evaluation of this run (None if none ran)."""
    stages: dict[str, StageOutcome] = field(default_factory=dict)
    """The stages this invocation ran, by name."""
    stopped: Stop | None = None
    """Why the ranks stopped before the run's last stage finished (a signal, the deadline): its newest checkpoint
    holds the place and train.resume=auto continues. None when every stage it was to run finished."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def train(cfg: RunConfig, env: DistEnv, signals: StopSignals | None = None,
          progress: Progress | None = None) -> RunResult:
    """Run the recipe's unfinished stages (or train.only_stage) in order; stop early, with a checkpoint, at
    train.deadline_minutes or when any rank has received one of `signals` (None: the deadline only). `progress`:
    where the steps report their step and phase (a Watchdog's)."""
    run = plan_run(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    # One layout for every stage of the run (stages differ in image size and text length, not in the heads, depth
    # and vocabulary the layout rules read): megatron-core's parallel state is built once per process.
    where = layout.place(cfg, env, model_config(cfg, tokenizer.vocab_size, stage=0))
    ctx = RunContext(cfg, env, device_of(env), tokenizer, where=where, started=time.monotonic(), signals=signals,
                     progress=progress or Progress())
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    if env.rank == 0:
        checkpoint.remove_partial(ctx.run_dir)
        if warning := fit_warning(cfg, env.world_size):  # the capacity planner, on a GPU it knows
            log.warning(warning)
        if run.finished:
            log.info("finished stages in %s: %s", ctx.run_dir, ", ".join(run.finished))
        if run.first == run.stop:
            log.info("nothing to run: %s", "the stage is already finished" if cfg.train.only_stage
                     else "every stage is finished")
    result = RunResult(step_offset(cfg, run.first), None, None)
    for index in range(run.first, run.stop):
        if index > run.first:  # a signal that came during the previous stage's evaluations or record
            result.stopped = agree_to_stop(signals, ctx.started, cfg.train.deadline_minutes, ctx.device)
            if result.stopped:
                log.warning("%s: every rank stopped before stage %s", result.stopped, cfg.stages[index].name)
                break
        resume_from = run.resume_from if index == run.first else None
        if env.rank == 0:
            clear_stale(cfg, index, fresh=resume_from is None)
        _barrier()
        outcome = StageRunner(ctx, index, resume_from, None if resume_from else start_weights(cfg, index)).run()
        result.stages[outcome.name] = outcome
        result.step = outcome.step
        result.final = outcome.final or result.final
        result.eval = outcome.retrieval or result.eval
        if not outcome.finished:
            result.stopped = outcome.stopped
            break
    if env.rank == 0:
        summary = {"step": result.step, "final": result.final, "eval": result.eval, "stopped": result.stopped,
                   "stages": {name: asdict(outcome) for name, outcome in result.stages.items()}, "time": time.time()}
        (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return result
