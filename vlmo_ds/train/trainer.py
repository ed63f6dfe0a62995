"""The training loop: one stage of a recipe on DeepSpeed, with logging, checkpoints, exact resume and evaluation.

Per optimizer step: the learning rate from the schedule; `accumulation` micro-batches, each one forward through the
engine (VLMo.forward runs the stage's loss function), engine.backward and engine.step (DeepSpeed steps the optimizer
on the accumulation boundary, clips and averages gradients over the data-parallel group).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlmo_ds.config import RunConfig, deepspeed_config, model_config, stage_plan
from vlmo_ds.data.tokenizer import load_tokenizer
from vlmo_ds.eval.metrics import format_table
from vlmo_ds.eval.retrieval import evaluate_retrieval
from vlmo_ds.model.flops import image_text_step_flops
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.parallel.launch import DistEnv, describe
from vlmo_ds.train import checkpoint
from vlmo_ds.train.engine import build_engine, compute_dtype, set_lr
from vlmo_ds.train.metrics import MetricsLogger
from vlmo_ds.train.optim import lr_at
from vlmo_ds.train.peak import peak_flops
from vlmo_ds.train.stages import build_loader, loss_function, samples_and_tokens

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    step: int
    final: dict[str, float] | None
    """The last step's data-parallel mean of each loss (None when no step ran)."""
    eval: dict[str, Any] | None


def _device(env: DistEnv) -> torch.device:
    return torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def _mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


def _grad_norm_before_step(engine) -> float | None:
    """ZeRO 0 keeps no gradient norm: take it from the (already averaged) gradients before the step clips them.
    ZeRO 1-3 report theirs after the step (get_global_grad_norm)."""
    if engine.zero_optimization_stage() != 0:
        return None
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


def _past_deadline(started: float, minutes: float | None, device: torch.device) -> bool:
    """Whether the time limit is reached, decided by rank 0 for every rank (clocks and speeds differ)."""
    if minutes is None:
        return False
    flag = torch.tensor([float(time.monotonic() - started > minutes * 60)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def train(cfg: RunConfig, env: DistEnv) -> RunResult:
    device = _device(env)
    run_dir = Path(cfg.run_dir)
    stage = cfg.stages[0]
    dp_size = env.world_size  # tensor and pipeline parallel layouts come with the parallelism work
    plan = stage_plan(cfg, 0, dp_size)
    tokenizer = load_tokenizer(cfg.tokenizer)
    model_cfg = model_config(cfg, tokenizer.vocab_size, stage=0)
    torch.manual_seed(cfg.seed)
    model = VLMo(model_cfg)
    ds_config = deepspeed_config(cfg, dp_size, stage=0)
    micro, accumulation = plan.micro_batch, plan.accumulation
    engine = build_engine(model.to(device), ds_config, plan.lr, cfg.optim.betas, cfg.optim.eps,
                          cfg.optim.weight_decay)
    dtype = compute_dtype(engine)
    loader = build_loader(stage, model_cfg, tokenizer, micro_batch=micro, dp_rank=env.rank, dp_size=dp_size,
                          num_workers=cfg.train.num_workers, open_shards=cfg.train.open_shards, seed=cfg.seed)
    loss_fn = loss_function(stage, cfg.parallel.itc_local_rows)
    steps = stage.steps

    def lr(step: int) -> float:
        return lr_at(step, steps, plan.lr, plan.warmup_steps, plan.end_lr)

    run_dir.mkdir(parents=True, exist_ok=True)
    if env.rank == 0:
        checkpoint.remove_partial(run_dir)
    start = 0
    resume_from = checkpoint.find_resume(run_dir, cfg.train.resume)
    if resume_from is not None:
        trainer_state, rank_state = checkpoint.load(engine, resume_from, env.rank)
        loader.load_state_dict(rank_state["loader"])
        start = trainer_state["step"]
    params = sum(p.numel() for p in model.parameters())
    if env.rank == 0:
        log.info("%s | ZeRO stage %d, %s, %.1fM parameters, %d micro x %d accumulation x %d ranks = %d per step | "
                 "checkpoints in %s%s", describe(env), ds_config["zero_optimization"]["stage"], cfg.precision,
                 params / 1e6, micro, accumulation, env.world_size, plan.global_batch,
                 checkpoint.root_of(run_dir), f" | resumed at step {start} from {resume_from}" if resume_from else "")

    samples, tokens = samples_and_tokens(stage, model_cfg, plan.global_batch)
    flops = image_text_step_flops(model_cfg, plan.global_batch) if stage.kind == "image_text" \
        else None
    scalars: dict[str, float] | None = None
    batches = iter(loader)
    started = time.monotonic()
    sample_log = open(run_dir / f"samples_rank{env.rank}.jsonl", "a") if cfg.train.record_samples else None
    peak = peak_flops(device, dtype) if flops else None
    with MetricsLogger(run_dir, enabled=env.rank == 0, total_steps=steps, flops_per_step=flops, peak_flops=peak,
                       samples_per_step=samples, tokens_per_step=tokens, log_interval=cfg.train.log_every,
                       resume_step=start, stage=stage.name) as metrics:

        def evaluate(at_step: int) -> dict[str, Any] | None:
            if not cfg.eval.retrieval:
                return None
            found = evaluate_retrieval(engine, cfg.eval.retrieval, tokenizer, model_cfg.image_size,
                                       model_cfg.max_text_len, batch_size=cfg.eval.batch, rank=env.rank,
                                       world_size=env.world_size, device=device)
            if env.rank == 0:
                metrics.log(at_step, {f"eval/{k}": v for k, v in found.items() if isinstance(v, (int, float))},
                            stage.name)
                log.info("retrieval at step %d on %s:\n%s", at_step, cfg.eval.retrieval, format_table(found))
            metrics.reset_timer()
            return found

        for step in range(start, steps):
            set_lr(engine, lr(step))
            accumulated: dict[str, torch.Tensor] = {}
            keys: list[str] = []
            for micro_step in range(accumulation):
                with metrics.data_wait():
                    raw = next(batches)
                keys += raw["key"]
                batch = _to_device(raw, device, dtype)
                seed = (cfg.seed * 1_000_003 + step) * accumulation + micro_step
                out = engine(loss_fn, batch, seed, None)
                engine.backward(out["loss"])
                if micro_step == accumulation - 1:
                    grad_norm = _grad_norm_before_step(engine)
                engine.step()
                for name, value in out.items():
                    accumulated[name] = accumulated.get(name, 0) + value.detach() / accumulation
            scalars = _mean_over_ranks(accumulated)
            grad_norm = engine.get_global_grad_norm() if grad_norm is None else grad_norm
            logged = {f"train/{k}": v for k, v in scalars.items()}
            logged["opt/lr"] = lr(step)
            if grad_norm is not None:
                logged["opt/grad_norm"] = float(grad_norm)
            logged.update({f"data/skipped_{k}": float(v) for k, v in loader.skipped.items()})
            metrics.log(step + 1, logged, stage.name)
            metrics.step_done(step + 1)
            if sample_log:
                sample_log.write(json.dumps({"step": step + 1, "keys": keys}) + "\n")
                sample_log.flush()
            out_of_time = _past_deadline(started, cfg.train.deadline_minutes, device)
            last = step + 1 == steps or out_of_time
            if (step + 1) % cfg.train.ckpt_every == 0 or last:
                checkpoint.save(engine, run_dir, step + 1, {"step": step + 1, "stage": stage.name},
                                {"loader": loader.state_dict()}, env.rank, cfg.train.keep_last)
                metrics.reset_timer()
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and not last:
                evaluate(step + 1)
            if out_of_time:
                log.warning("train.deadline_minutes=%s reached at step %d: checkpoint written, stopping; run the "
                            "same command again to continue", cfg.train.deadline_minutes, step + 1)
                steps = step + 1
                break
        if sample_log:
            sample_log.close()
        result = evaluate(steps) if steps == stage.steps else None  # a deadline stop evaluates on completion
    if env.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps({"step": steps, "final": scalars,
                                                          "eval": result, "time": time.time()}, indent=1,
                                                         default=str))
    return RunResult(steps, scalars, result)
