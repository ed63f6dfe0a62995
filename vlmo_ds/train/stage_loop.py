"""One stage of a recipe on DeepSpeed: its model, trainable set, engine, loader and step loop; checkpoints, exact
resume, evaluations, and the stage checkpoint it leaves for the next stage.

Per optimizer step: the learning rate from the stage's schedule; `accumulation` micro-batches, each one forward
through the engine (VLMo.forward runs the stage's loss function), engine.backward and engine.step (DeepSpeed steps
the optimizer on the accumulation boundary, clips and averages gradients over the data-parallel group). Under
pipeline parallelism the stage runs every micro-batch of the step in megatron-core's schedule instead, then the
gradients are averaged over the data-parallel group and the engine steps once (vlmo_ds.train.layout).
Steps are numbered globally across stages (stage i's first step is 1 + the steps of the stages before it), so
metrics.jsonl, TensorBoard and checkpoint names run on one axis; trainer.json also keeps the step inside the stage.
"""
from __future__ import annotations

import gc
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmo_ds.config import TASK_KINDS, RunConfig, deepspeed_config, model_config, stage_plan
from vlmo_ds.config.plan import resume_changes
from vlmo_ds.data.formats.vqa2 import VOCAB_FILE
from vlmo_ds.data.replica import replica_loader
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.eval.retrieval import evaluate_retrieval
from vlmo_ds.eval.tables import retrieval_table, task_table
from vlmo_ds.model.published import read_state_dict
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.parallel.checkpointing import set_activation_checkpointing
from vlmo_ds.parallel.compile import compile_blocks
from vlmo_ds.parallel.launch import DistEnv, describe
from vlmo_ds.ckpt.layout import check_resume_model
from vlmo_ds.tasks.answers import answer_source, answer_vocab_text, stage_answers
from vlmo_ds.tasks.kinds import evaluate_task
from vlmo_ds.tasks.optim import head_lr_mult
from vlmo_ds.tasks.start import build_task_model, load_task_weights
from vlmo_ds.train import checkpoint, layout, resume_check, stage_record
from vlmo_ds.train.divergence import DivergenceGuard, skip_if_not_finite
from vlmo_ds.train.engine import build_engine, compute_dtype, set_lr
from vlmo_ds.train.freeze import apply_trainable
from vlmo_ds.train.metrics import MetricsLogger
from vlmo_ds.train.optim import LrSchedule
from vlmo_ds.train.peak import peak_flops
from vlmo_ds.train.preemption import Stop, StopPoll, StopSignals, flag_group
from vlmo_ds.train.scalars import StepScalars
from vlmo_ds.train.stages import build_loader, loss_function, samples_and_tokens, step_flops
from vlmo_ds.train.step import grad_norm_before_step, to_device
from vlmo_ds.train.text_eval import evaluate_text_mlm, held_out_batches
from vlmo_ds.train.watchdog import Progress
from vlmo_ds.train.transition import copy_text_to_vl, load_start_weights

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every stage of one run shares."""

    cfg: RunConfig
    env: DistEnv
    device: torch.device
    tokenizer: Tokenizer
    where: layout.Placement
    """This rank in the run's layout (tensor x pipeline x data) and its process groups."""
    started: float
    """time.monotonic() at the run's start (train.deadline_minutes counts from it)."""
    signals: StopSignals | None = None
    """The stop signals this process records (None: only train.deadline_minutes stops a run early)."""
    peak: float | None = None
    """Peak FLOP/s of the device for MFU (measured once, by the first stage)."""
    progress: Progress = field(default_factory=Progress)
    """This rank's step and phase, read by the hang watchdog (vlmo_ds.train.watchdog)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def dp_size(self) -> int:
        return self.where.layout.data

    @cached_property
    def stop_group(self):
        """The group of the per-step stop votes (preemption.flag_group): made once per run, by every rank's first
        stage at the same point."""
        return flag_group()


@dataclass
class StageOutcome:
    """What one stage run returns."""

    name: str
    step: int
    """Global steps completed when the stage run ended."""
    finished: bool
    """False when a stop signal or the deadline stopped it inside the stage."""
    final: dict[str, float] | None
    """The last step's data-parallel mean of each loss (None when no step ran in this process)."""
    retrieval: dict[str, Any] | None
    """Zero-shot retrieval at the end of an image_text stage (eval.retrieval)."""
    text_mlm: dict[str, float] | None
    task: dict[str, Any] | None = None
    """A fine-tuning stage's evaluation on its eval_data (vlmo_ds.eval.tables.task_table prints it)."""
    stopped: Stop | None = None
    """Why every rank stopped after its last step (a signal, the deadline), None if nothing asked it to stop."""


def step_offset(cfg: RunConfig, index: int) -> int:
    """Global steps before stage `index`."""
    return sum(stage.steps for stage in cfg.stages[:index])


def build_model(cfg: RunConfig, vocab_size: int, index: int, num_answers: int | None = None) -> VLMo:
    """Stage `index`'s model, initialised after seeding torch, numpy and random with seed + index, so a stage starts
    alike whether it follows the previous stage in one process or starts a job of its own. A fine-tuning stage's
    model carries its task head (num_answers: a vqa stage's answer count)."""
    seed = cfg.seed + index
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    kind, model_cfg = cfg.stages[index].kind, model_config(cfg, vocab_size, stage=index)
    return build_task_model(model_cfg, kind, num_answers) if kind in TASK_KINDS else VLMo(model_cfg)


def start_model(ctx: RunContext, index: int, weights: Path | None, num_answers: int | None = None) -> VLMo:
    """The model of a stage starting afresh: initialised, then filled from `weights` (None: initialisation only);
    a fine-tuning stage's NLVR2 type row and new head as vlmo_ds.tasks.start makes them."""
    stage = ctx.cfg.stages[index]
    model = build_model(ctx.cfg, ctx.tokenizer.vocab_size, index, num_answers)
    if weights is not None:
        state, src = read_state_dict(weights), stage_record.weights_config(weights)
        report = load_task_weights(model, state, stage.kind, src) if stage.kind in TASK_KINDS \
            else load_start_weights(model, state, src)
        if ctx.env.rank == 0:
            log.info("stage %s starts from %s%s%s%s", stage.name, weights,
                     f" | re-sized: {'; '.join(report.resized)}" if report.resized else "",
                     f" | kept initialised: {len(report.kept_init)} entries" if report.kept_init else "",
                     f" | left out: {', '.join(report.left_out)}" if report.left_out else "")
    if stage.init_vl_from_text:
        blocks = copy_text_to_vl(model)
        if ctx.env.rank == 0:
            log.info("stage %s: VL experts of %d blocks copied from the text experts", stage.name, blocks)
    return model


PREDICTION_SUFFIX = {"vqa": ".json", "nlvr2": ".csv"}
"""Fine-tuning evaluations that write their predictions: the VQA server's results JSON, NLVR2's official CSV."""


class StageRunner:
    """Runs stage `index` from a fresh start (`weights`) or from a checkpoint inside it (`resume_from`)."""

    def __init__(self, ctx: RunContext, index: int, resume_from: Path | None, weights: Path | None) -> None:
        cfg, env, where = ctx.cfg, ctx.env, ctx.where
        self.ctx, self.index, self.stage = ctx, index, cfg.stages[index]
        self.plan = stage_plan(cfg, index, ctx.dp_size)
        self.model_cfg = model_config(cfg, ctx.tokenizer.vocab_size, stage=index)
        self.schedule = LrSchedule(self.plan.lr, self.plan.warmup_steps, self.plan.end_lr, self.stage.steps)
        self.recipe = resume_check.recipe_of(cfg, self.plan, step_offset(cfg, index))
        if resume_from is not None:
            checkpoint.check_layout(resume_from, where.layout.as_dict())
            check_resume_model(resume_from, self.model_cfg)
            self.schedule, note = resume_check.check_resume(resume_from, self.recipe, self.model_cfg, self.schedule,
                                                            resume_changes(cfg))
            if note and env.rank == 0:
                log.warning("%s", note)
        self.answers = stage_answers(self.stage)
        count = None if self.answers is None else len(self.answers)
        model = build_model(cfg, ctx.tokenizer.vocab_size, index, count) if resume_from \
            else start_model(ctx, index, weights, count)
        ds_config = layout.engine_config(deepspeed_config(cfg, ctx.dp_size, stage=index), where,
                                         self.plan.micro_batch, self.plan.accumulation)
        module = layout.rank_module(model, where, ds_config, ctx.device)
        trainable = apply_trainable(module, self.stage.trainable)
        # the recipe's groups, as the checkpoint tools read them (a pipeline stage holds only some of them)
        self._trainable = "all" if self.stage.trainable == "all" else list(self.stage.trainable)
        set_activation_checkpointing(module, 1 if cfg.parallel.activation_checkpointing else 0)
        if cfg.parallel.compile_blocks:
            compile_blocks(module)
        if env.rank == 0:
            log.info("%s", layout.describe(where, module))
        self.engine = build_engine(module, ds_config, self.plan.lr, cfg.optim.betas, cfg.optim.eps,
                                   cfg.optim.weight_decay, mpu=where.mpu, head_lr_mult=head_lr_mult(self.stage))
        self.dtype = compute_dtype(self.engine)
        # one rank of the replica reads and decodes, the replica's other ranks receive its batches
        make = partial(build_loader, self.stage, self.model_cfg, ctx.tokenizer, micro_batch=self.plan.micro_batch,
                       dp_rank=where.dp_rank, dp_size=ctx.dp_size, open_shards=cfg.train.open_shards, seed=cfg.seed,
                       answers=self.answers, pin_memory=ctx.device.type == "cuda")
        self.loader = replica_loader(make, where.mp_group, ctx.device, num_workers=cfg.train.num_workers,
                                     local_world_size=env.local_world_size, slurm_tasks=env.launcher == "slurm")
        self.loss_fn = loss_function(self.stage, cfg.parallel.itc_local_rows, where.tp_group)
        self.offset = step_offset(cfg, index)
        self.start = 0
        if resume_from is not None:
            trainer_state, rank_state = checkpoint.load(self.engine, resume_from, env.rank)
            if rank_state["loader"] is None:  # resharded to another data-parallel size: positions do not carry over
                log.warning("checkpoint %s holds no loader position for data-parallel rank %d (resharded to another "
                            "data-parallel size): this stage's data order restarts at its step", resume_from,
                            where.dp_rank)
            else:
                self.loader.load_state_dict(rank_state["loader"])
            self.start = trainer_state.get("stage_step", trainer_state["step"] - self.offset)
        if env.rank == 0:
            log.info("stage %d/%d %s (%s) | %s | ZeRO stage %d, %s | %.2fM of %.2fM parameters train (%s) | "
                     "%d micro x %d accumulation x %d ranks = %d per step | steps %d-%d%s", index + 1,
                     len(cfg.stages), self.stage.name, self.stage.kind, describe(env),
                     ds_config["zero_optimization"]["stage"], cfg.precision, trainable.trainable / 1e6,
                     (trainable.trainable + trainable.frozen) / 1e6, ", ".join(trainable.groups),
                     self.plan.micro_batch, self.plan.accumulation, ctx.dp_size, self.plan.global_batch,
                     self.offset + 1, self.offset + self.stage.steps,
                     f" | resumed at step {self.offset + self.start} from {resume_from}" if resume_from else "")

    def lr(self, stage_step: int) -> float:
        return self.schedule.at(stage_step)

    def run(self) -> StageOutcome:
        ctx, stage = self.ctx, self.stage
        samples, tokens = samples_and_tokens(stage, self.model_cfg, self.plan.global_batch)
        flops = step_flops(stage, self.model_cfg, self.plan.global_batch)
        if ctx.peak is None:
            ctx.peak = peak_flops(ctx.device, self.dtype)
        # resume_step is the stage's first global step even on a fresh start: metric lines an earlier, killed
        # attempt wrote past it are dropped (read_metrics) and hidden (TensorBoard's purge_step).
        with MetricsLogger(ctx.run_dir, enabled=ctx.env.rank == 0, total_steps=self.offset + stage.steps,
                           flops_per_step=flops, peak_flops=ctx.peak,
                           samples_per_step=samples, tokens_per_step=tokens, log_interval=ctx.cfg.train.log_every,
                           resume_step=self.offset + self.start, stage=stage.name, wandb=ctx.cfg.log.wandb,
                           run_config=ctx.cfg) as metrics:
            self.metrics = metrics
            done, final, stopped = self._loop()
            ctx.progress.pause("evaluation")
            finished = done == stage.steps
            retrieval = text_mlm = task = None
            if finished:
                retrieval, text_mlm, task = self._final_evaluations()
        if finished:
            self._write_record(final, retrieval, text_mlm, task)
        outcome = StageOutcome(stage.name, self.offset + done, finished, final, retrieval, text_mlm, task, stopped)
        self.close()
        return outcome

    def _loop(self) -> tuple[int, dict[str, float] | None, Stop | None]:
        """Steps from self.start to the stage's end or until the ranks agree to stop (a signal, the deadline):
        (stage steps done, last step's losses, why they stopped). The stop vote of a step is read after the next
        step (preemption.StopPoll), so no step waits for it."""
        cfg, stage = self.ctx.cfg, self.stage
        batches = iter(self.loader)
        self.scalars, self.final = StepScalars(self.ctx.device), None
        self.guard = DivergenceGuard(cfg.train.max_bad_steps, self.ctx.run_dir, self.ctx.device, self.ctx.env.rank)
        poll = StopPoll(self.ctx.signals, self.ctx.started, cfg.train.deadline_minutes, self.ctx.stop_group)
        sample_log = open(self.ctx.run_dir / f"samples_rank{self.ctx.env.rank}.jsonl", "a") \
            if cfg.train.record_samples else None
        try:
            for step in range(self.start, stage.steps):
                keys = self._step(step, batches)
                at = self.offset + step + 1
                if sample_log:
                    sample_log.write(json.dumps({"step": at, "keys": keys}) + "\n")
                    sample_log.flush()
                stop = poll.after_step(last=step + 1 == stage.steps)
                last = step + 1 == stage.steps or stop is not None
                save = (step + 1) % cfg.train.ckpt_every == 0 or last
                evaluate = cfg.eval.every and (step + 1) % cfg.eval.every == 0 and not last
                if save or evaluate:  # lines first: a run killed after the checkpoint has written them all
                    self._write_lines()
                if save and self.guard.may_save(self.engine, at):
                    self.ctx.progress.mark(at, "checkpoint")
                    trainer = {"step": at, "stage": stage.name, "stage_step": step + 1,
                               "layout": self.ctx.where.layout.as_dict(), "model": asdict(self.model_cfg),
                               "trainable": self._trainable, "recipe": self.recipe,
                               "lr_schedule": asdict(self.schedule)}
                    checkpoint.save(self.engine, self.ctx.run_dir, at, trainer, {"loader": self.loader.state_dict()},
                                    self.ctx.env.rank, cfg.train.keep_last)
                    self.metrics.reset_timer()
                if evaluate:
                    self.ctx.progress.pause("evaluation")
                    self._retrieval(at)
                if stop is not None:
                    log.warning("%s: every rank stopped after step %d with a checkpoint; the same command "
                                "continues from it", stop, at)
                    return step + 1, self.final, stop
        finally:
            if sample_log:
                sample_log.close()
        return stage.steps, self.final, None

    def _write_lines(self) -> None:
        """The metric lines of the steps kept since the last ones: one all-reduce and one read for all of them
        (collective: every rank calls it at the same steps); self.final becomes the last finite step's losses. Stops
        the run when they end train.max_bad_steps non-finite steps in a row (vlmo_ds.train.divergence)."""
        for line in self.scalars.flush():
            self.metrics.log(line.step, line.scalars(), self.stage.name, wall=line.time)
            if self.guard.count(line):
                self.final = line.losses
        self.guard.stop_if_diverged()

    def _step(self, step: int, batches) -> list[str]:
        """One optimizer step (stage step `step`, 0-based): returns the sample keys. Its losses and gradient norm
        stay on the device (self.scalars) until the log interval's step."""
        engine, accumulation, where, progress = self.engine, self.plan.accumulation, self.ctx.where, self.ctx.progress
        at = self.offset + step + 1
        set_lr(engine, self.lr(step))
        accumulated: dict[str, torch.Tensor] = {}
        keys: list[str] = []
        grad_norm = None
        micro_batches, seeds = [], []
        for micro_step in range(accumulation):
            progress.mark(at, "data")
            with self.metrics.data_wait():
                raw = next(batches)
            keys += raw["key"]
            batch = to_device(raw, self.ctx.device, self.dtype)
            seed = (self.ctx.cfg.seed * 1_000_003 + at - 1) * accumulation + micro_step  # ITM negatives
            if where.pipelined:  # the schedule takes every micro-batch of the step at once
                micro_batches.append(batch)
                seeds.append(seed)
                continue
            progress.mark(at, "forward")
            out = engine(self.loss_fn, batch, seed, where.dp_group)
            progress.mark(at, "backward")
            engine.backward(out["loss"])
            progress.mark(at, "step")
            if micro_step == accumulation - 1:
                grad_norm = grad_norm_before_step(engine, where.mp_group, where.tp_rank)
                skip_if_not_finite(engine, grad_norm)
            engine.step()
            for name, value in out.items():
                accumulated[name] = accumulated.get(name, 0) + value.detach() / accumulation
        if where.pipelined:  # the replica's mean over the micro-batches (0-dim tensors, or floats)
            progress.mark(at, "forward")  # the schedule's forward and backward passes
            accumulated = layout.pipeline_step(engine, self.stage, micro_batches, seeds, where,
                                               self.ctx.cfg.parallel.itc_local_rows)
            progress.mark(at, "step")
            grad_norm = grad_norm_before_step(engine, where.mp_group, where.tp_rank)
            skip_if_not_finite(engine, grad_norm)
            engine.step()
        grad_norm = engine.get_global_grad_norm() if grad_norm is None else grad_norm
        host = {"opt/lr": self.lr(step), **{f"data/skipped_{k}": float(v) for k, v in self.loader.skipped.items()}}
        self.scalars.add(at, accumulated, grad_norm, host)
        if at % self.ctx.cfg.train.log_every == 0:
            self._write_lines()
        self.metrics.step_done(at)
        return keys

    def _retrieval(self, at: int) -> dict[str, Any] | None:
        """Zero-shot retrieval (image_text stages, eval.retrieval set): logged at global step `at`."""
        ctx = self.ctx
        if not ctx.cfg.eval.retrieval or self.stage.kind != "image_text":
            return None
        found = evaluate_retrieval(self.engine, ctx.cfg.eval.retrieval, ctx.tokenizer, self.model_cfg.image_size,
                                   self.model_cfg.max_text_len, batch_size=ctx.cfg.eval.batch,
                                   rank=ctx.where.dp_rank, world_size=ctx.dp_size, group=ctx.where.dp_group,
                                   device=ctx.device, rerank_k=ctx.cfg.eval.rerank_k)
        if ctx.env.rank == 0:
            self.metrics.log(at, {f"eval/{k}": v for k, v in found.items() if isinstance(v, (int, float))},
                             self.stage.name)
            log.info("retrieval at step %d on %s:\n%s", at, ctx.cfg.eval.retrieval, retrieval_table(found))
        self.metrics.reset_timer()
        return found

    def _text_mlm(self, at: int) -> dict[str, float] | None:
        """MLM accuracy on eval.text_mlm beside the unigram baseline (text_mlm stages)."""
        ctx, stage = self.ctx, self.stage
        if not ctx.cfg.eval.text_mlm or stage.kind != "text_mlm":
            return None
        batches = held_out_batches(ctx.cfg.eval.text_mlm, ctx.tokenizer, self.model_cfg.max_text_len,
                                   ctx.cfg.eval.batch, stage.mlm_prob, stage.whole_word)
        found = evaluate_text_mlm(self.engine, batches, self.model_cfg.vocab_size, rank=ctx.env.rank,
                                  world_size=ctx.env.world_size, device=ctx.device)
        if ctx.env.rank == 0:
            self.metrics.log(at, {"eval/text_mlm_acc": found["accuracy"],
                                  "eval/text_mlm_unigram_acc": found["unigram"]}, stage.name)
            log.info("text MLM on held-out text (%s, %d masked tokens): accuracy %.4f, unigram baseline %.4f",
                     ctx.cfg.eval.text_mlm, found["masked"], found["accuracy"], found["unigram"])
        self.metrics.reset_timer()
        return found

    def _task(self, at: int) -> dict[str, Any] | None:
        """A fine-tuning stage's evaluation on its eval_data (a retrieval stage: else eval.retrieval); VQA answers
        and NLVR2 predictions go to RUN_DIR/predictions/<stage>.json / .csv."""
        ctx, stage = self.ctx, self.stage
        data = stage.eval_data or (ctx.cfg.eval.retrieval if stage.kind == "retrieval" else None)
        if stage.kind not in TASK_KINDS or not data:
            return None
        output = None
        if stage.kind in PREDICTION_SUFFIX:
            output = ctx.run_dir / "predictions" / f"{stage.name}{PREDICTION_SUFFIX[stage.kind]}"
            output.parent.mkdir(parents=True, exist_ok=True)
        found = evaluate_task(stage.kind, self.engine, data, ctx.tokenizer, self.model_cfg,
                              batch_size=ctx.cfg.eval.batch, rank=ctx.where.dp_rank, world_size=ctx.dp_size,
                              group=ctx.where.dp_group, device=ctx.device, answers=self.answers,
                              rerank_k=ctx.cfg.eval.rerank_k, output=output)
        if ctx.env.rank == 0:
            self.metrics.log(at, {f"eval/{stage.kind}/{k}": v for k, v in found.items()
                                  if isinstance(v, (int, float))}, stage.name)
            log.info("%s evaluation at step %d on %s:\n%s", stage.kind, at, data, task_table(stage.kind, found))
        self.metrics.reset_timer()
        return found

    def _final_evaluations(self) -> tuple[dict[str, Any] | None, dict[str, float] | None, dict[str, Any] | None]:
        at = self.offset + self.stage.steps
        return self._retrieval(at), self._text_mlm(at), self._task(at)

    def _write_record(self, final, retrieval, text_mlm, task) -> None:
        ctx, stage = self.ctx, self.stage
        where = ctx.where
        state = stage_record.consolidated_state_dict(self.engine, self.model_cfg, where.mp_group, where.tp_rank,
                                                     where.pp_rank, where.layout.tensor, where.dp_rank)
        record = {"name": stage.name, "kind": stage.kind, "index": self.index, "steps": stage.steps,
                  "global_step": self.offset + stage.steps, "final": final, "retrieval": retrieval,
                  "text_mlm": text_mlm, "task": task, "time": time.time()}
        # the answer table beside the weights: the evaluation command reads the one the head was trained with
        files = {} if self.answers is None else {VOCAB_FILE: answer_vocab_text(self.answers, answer_source(stage))}
        path = stage_record.write_record(ctx.run_dir, stage.name, state, self.model_cfg, record, ctx.env.rank, files)
        if ctx.env.rank == 0:
            log.info("stage %s finished: weights in %s", stage.name, path)

    def close(self) -> None:
        """Free the engine (the next stage builds its own) and the loader's workers."""
        del self.engine, self.loader
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
