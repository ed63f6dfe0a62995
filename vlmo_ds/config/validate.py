"""Range and consistency checks of a typed RunConfig, run by load_config before anything heavy is built.

Each check raises ConfigError with the key path to change. Files the quick start may still have to create (the
tokenizer, shards) are not checked here but in check_files; files a user must already have (the DeepSpeed JSON,
a checkpoint to resume from) are.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlmo_ds.config.errors import ConfigError, MissingFileError, did_you_mean
from vlmo_ds.config.groups import expand, present_groups
from vlmo_ds.config.plan import (accumulation, model_config, model_value, resume_changes, start_stage,
                                 vocab_stand_in, warmup_steps)
from vlmo_ds.config.schema import (
    LOSS_KEYS,
    MIM_TARGETS,
    RESUME_CHANGES,
    RESUME_WORDS,
    TASK_KINDS,
    TRAINABLE_GROUPS,
    RunConfig,
    StageConfig,
)
from vlmo_ds.model.config import PRESETS, ModelConfig
from vlmo_ds.parallel.layout_rules import check_layout

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")  # a letter first: overrides tell stages.0 from stages.name


def _positive(value: float | int | None, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _fraction(value: float, key: str, low_open: bool = True) -> None:
    if not (0 < value < 1 if low_open else 0 <= value < 1):
        raise ConfigError(f"{key}: must be in {'(0, 1)' if low_open else '[0, 1)'}, got {value}")


def _check_model(cfg: RunConfig) -> None:
    if cfg.model.preset not in PRESETS:
        name = cfg.model.preset
        raise ConfigError(f"model.preset: unknown preset '{name}'{did_you_mean(name, PRESETS)}; "
                          f"presets: {', '.join(PRESETS)}")
    if model_value(cfg, "vocab_size") != "auto":
        _positive(model_value(cfg, "vocab_size"), "model.vocab_size")
    model_config(cfg, vocab_stand_in(cfg))


def _offloads(zero: dict[str, Any], section: str) -> bool:
    """Whether a zero_optimization offload section is on (present with a device other than "none")."""
    device = (zero.get(section) or {}).get("device", "none")
    return device not in (None, "none")


def _check_parallel(cfg: RunConfig, ds: dict[str, Any], world_size: int | None) -> None:
    """The layout rules of vlmo_ds.parallel.layout_rules (the trainer applies the same at start-up), DeepSpeed's
    offload needs, and what the evaluations can run under model parallelism."""
    par = cfg.parallel
    if par.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {par.zero_stage}")
    ranks = world_size if world_size is not None else par.tensor * par.pipeline
    model_cfg = model_config(cfg, vocab_stand_in(cfg))
    try:
        check_layout(ranks, par.tensor, par.pipeline, par.zero_stage, model_cfg, grad_clip=cfg.optim.grad_clip)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if par.compile_blocks and (par.zero_stage == 3 or par.tensor > 1):
        raise ConfigError(f"parallel.compile_blocks: compiled blocks run with ZeRO 0-2 and parallel.tensor=1 (ZeRO-3 "
                          "gathers parameters and tensor parallelism all-reduces activations inside every block); set "
                          f"parallel.compile_blocks=false (got parallel.zero_stage={par.zero_stage}, "
                          f"parallel.tensor={par.tensor})")
    zero = ds.get("zero_optimization", {})
    if _offloads(zero, "offload_param") and par.zero_stage != 3:
        raise ConfigError(f"parallel.zero_stage: {cfg.deepspeed} offloads parameters, which needs ZeRO 3; "
                          f"set parallel.zero_stage=3 (got {par.zero_stage})")
    if _offloads(zero, "offload_optimizer") and par.zero_stage == 0:
        raise ConfigError(f"parallel.zero_stage: {cfg.deepspeed} offloads the optimizer, which needs ZeRO 1-3; "
                          "set parallel.zero_stage=1 or higher")
    # Evaluation runs the whole model (encode_image / encode_text), which a pipeline stage does not hold; the
    # held-out text MLM scores whole-vocabulary logits, which a tensor-parallel rank does not hold.
    if par.pipeline > 1 and cfg.eval.retrieval:
        raise ConfigError(f"eval.retrieval: retrieval evaluation needs the whole model on every rank, not "
                          f"parallel.pipeline={par.pipeline} stages; set eval.retrieval=null and evaluate the "
                          "stage's weights (RUN_DIR/stages/NAME/weights.safetensors) afterwards")
    if (par.pipeline > 1 or par.tensor > 1) and cfg.eval.text_mlm:
        raise ConfigError(f"eval.text_mlm: the held-out text MLM evaluation runs on whole models only, not "
                          f"parallel.tensor={par.tensor} x parallel.pipeline={par.pipeline}; set eval.text_mlm=null")


def _check_optim(cfg: RunConfig) -> None:
    opt = cfg.optim
    _positive(opt.lr, "optim.lr")
    for i, beta in enumerate(opt.betas):
        _fraction(beta, f"optim.betas.{i}", low_open=False)
    _positive(opt.eps, "optim.eps")
    _positive(opt.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(opt.end_lr, "optim.end_lr", allow_zero=True)
    _positive(opt.grad_clip, "optim.grad_clip", allow_zero=True)


def _check_warmup(warmup: float | int, steps: int, key: str, where_steps: str) -> None:
    if isinstance(warmup, float):
        if not 0 <= warmup < 1:
            raise ConfigError(f"{key}: a fractional warm-up must be in [0, 1), got {warmup}; "
                              "write a whole number (e.g. 2500) for a step count")
    elif warmup < 0:
        raise ConfigError(f"{key}: must be >= 0 steps, got {warmup}")
    elif warmup_steps(warmup, steps) >= steps:
        raise ConfigError(f"{key}: {warmup} warm-up steps is not below {where_steps}={steps}; "
                          "lower the warm-up or use a fraction such as 0.1")


def _check_train(cfg: RunConfig) -> None:
    tr = cfg.train
    for name in ("micro_batch", "global_batch", "open_shards", "log_every", "ckpt_every", "keep_last",
                 "max_bad_steps"):
        _positive(getattr(tr, name), f"train.{name}")
    _positive(tr.num_workers, "train.num_workers", allow_zero=True)
    _positive(tr.deadline_minutes, "train.deadline_minutes")
    _positive(tr.collective_timeout_minutes, "train.collective_timeout_minutes")
    if tr.resume not in RESUME_WORDS and not Path(tr.resume).exists():
        raise MissingFileError(f"train.resume: checkpoint {tr.resume} does not exist; give an existing checkpoint, "
                               "'auto' (latest in the run folder, if any) or 'none'")
    for name in resume_changes(cfg):
        if name not in RESUME_CHANGES:
            raise ConfigError(f"train.allow_resume_changes: '{name}' is not a change a resume can accept"
                              f"{did_you_mean(name, RESUME_CHANGES)}; name some of {', '.join(RESUME_CHANGES)}")
    _positive(cfg.eval.every, "eval.every", allow_zero=True)
    _positive(cfg.eval.batch, "eval.batch")
    _positive(cfg.eval.rerank_k, "eval.rerank_k", allow_zero=True)


def _check_stage(cfg: RunConfig, index: int, stage: StageConfig, world_size: int | None) -> None:
    key = f"stages.{index}"
    if not _NAME.match(stage.name):
        raise ConfigError(f"{key}.name: '{stage.name}' must start with a letter and hold only letters, digits, "
                          "'_', '-' and '.' (it names folders and overrides)")
    if not stage.data:
        raise ConfigError(f"{key}.data: no shard sources; give a shard folder or pattern")
    for i, source in enumerate(stage.data):
        if not source.shards:
            raise ConfigError(f"{key}.data.{i}.shards: empty; give a shard folder or pattern")
        _positive(source.weight, f"{key}.data.{i}.weight")
    _positive(stage.steps, f"{key}.steps")
    _positive(stage.lr, f"{key}.lr")
    lr = stage.lr if stage.lr is not None else cfg.optim.lr
    if cfg.optim.end_lr > lr:
        raise ConfigError(f"optim.end_lr: {cfg.optim.end_lr} is above {key}'s peak lr {lr}; lower optim.end_lr")
    warmup_key = f"{key}.warmup" if stage.warmup is not None else "optim.warmup"
    warmup = stage.warmup if stage.warmup is not None else cfg.optim.warmup
    _check_warmup(warmup, stage.steps, warmup_key, f"{key}.steps")
    _positive(stage.micro_batch, f"{key}.micro_batch")
    _positive(stage.global_batch, f"{key}.global_batch")
    # With the world size unknown, global_batch must at least hold whole micro-batches (one data-parallel rank).
    accumulation(cfg, index, world_size // (cfg.parallel.tensor * cfg.parallel.pipeline) if world_size else 1)
    allowed = LOSS_KEYS[stage.kind]
    for name, weight in stage.loss_weights.items():
        if name not in allowed:
            raise ConfigError(f"unknown key '{key}.loss_weights.{name}'{did_you_mean(name, allowed)}; "
                              f"{stage.kind} stages weigh {', '.join(allowed)}")
        _positive(weight, f"{key}.loss_weights.{name}", allow_zero=True)
    if not any(stage.loss_weights.values()):
        raise ConfigError(f"{key}.loss_weights: every weight is 0; give at least one objective a positive weight")
    if stage.trainable != "all":
        if isinstance(stage.trainable, str) or not stage.trainable:
            raise ConfigError(f"{key}.trainable: must be 'all' or a non-empty list of groups, got {stage.trainable!r}")
        for group in stage.trainable:
            if group not in TRAINABLE_GROUPS:
                raise ConfigError(f"{key}.trainable: unknown group '{group}'{did_you_mean(group, TRAINABLE_GROUPS)}; "
                                  f"groups: {', '.join(TRAINABLE_GROUPS)}")
    _fraction(stage.mlm_prob, f"{key}.mlm_prob")
    _fraction(stage.mim_ratio, f"{key}.mim_ratio")
    low, high = stage.crop_scale
    if not 0 < low <= high <= 1:
        raise ConfigError(f"{key}.crop_scale: must be [low, high] with 0 < low <= high <= 1, got [{low}, {high}]")
    _positive(stage.image_size, f"{key}.image_size")
    _positive(stage.text_len, f"{key}.text_len")
    _check_mim(cfg, index, stage)
    model_cfg = model_config(cfg, vocab_stand_in(cfg), stage=index)
    if stage.trainable != "all":
        _check_groups_present(key, stage, model_cfg)
    _check_task(cfg, index, stage)
    before = start_stage(cfg, index)
    if before is not None:
        _check_transition(index, before, model_config(cfg, vocab_stand_in(cfg), stage=before), model_cfg)


def _check_task(cfg: RunConfig, index: int, stage: StageConfig) -> None:
    """What only fine-tuning stages have (eval_data, answers, head_lr_mult), and what they need: one data source,
    data-parallel layouts (the task heads and evaluations run on whole models)."""
    key = f"stages.{index}"
    task = stage.kind in TASK_KINDS
    for name, allowed in (("eval_data", task), ("answers", stage.kind == "vqa"),
                          ("head_lr_mult", stage.kind in ("vqa", "nlvr2"))):
        if getattr(stage, name) is not None and not allowed:
            where = "vqa stages" if name == "answers" else ("vqa and nlvr2 stages (the task heads)"
                                                            if name == "head_lr_mult" else "fine-tuning stages")
            raise ConfigError(f"{key}.{name}: only {where} have it, this is a {stage.kind} stage; remove it")
    if not task:
        return
    _positive(stage.head_lr_mult, f"{key}.head_lr_mult")
    if len(stage.data) > 1:
        raise ConfigError(f"{key}.data: a {stage.kind} stage reads one shard source, got {len(stage.data)}; "
                          "merge the splits into one folder or pattern")
    par = cfg.parallel
    if par.tensor > 1 or par.pipeline > 1:
        raise ConfigError(f"{key}.kind: {stage.kind} fine-tuning runs data-parallel (any ZeRO stage), not "
                          f"parallel.tensor={par.tensor} x parallel.pipeline={par.pipeline}; run it as a recipe of "
                          "its own with parallel.tensor=1 and parallel.pipeline=1")


def _check_mim(cfg: RunConfig, index: int, stage: StageConfig) -> None:
    key = f"stages.{index}"
    if stage.mim_target is not None:
        if stage.kind != "image_mim":
            raise ConfigError(f"{key}.mim_target: only image_mim stages have MIM targets, this is a {stage.kind} "
                              "stage; remove it")
        if stage.mim_target not in MIM_TARGETS:
            raise ConfigError(f"{key}.mim_target: must be {' or '.join(MIM_TARGETS)}, got '{stage.mim_target}'"
                              f"{did_you_mean(stage.mim_target, MIM_TARGETS)}")
    if stage.kind == "image_mim" and stage.mim_target is None and model_value(cfg, "mim_targets") is None:
        raise ConfigError(f"{key}.kind: image_mim stages need a masked-image head; set {key}.mim_target=pixels "
                          "(or tokens, with visual-token ids in the shards)")


def _check_groups_present(key: str, stage: StageConfig, model_cfg: ModelConfig) -> None:
    """Each listed group must name parameters of this stage's model; only relative_position may be empty (a model
    with absolute positions has no table, and the default trainable sets name it)."""
    present = present_groups(model_cfg)
    may_be_empty = set() if model_cfg.rel_pos else {"relative_position"}
    for group in stage.trainable:
        members = expand([group])
        if not members & present and not members <= may_be_empty:
            why = " (the MIM head exists only in image_mim stages)" if group == "mim_head" else ""
            raise ConfigError(f"{key}.trainable: group '{group}' names no parameter of this stage's model{why}; "
                              "remove it")
    if not expand(stage.trainable) & present:
        raise ConfigError(f"{key}.trainable: names no parameter of this stage's model; add a group that trains")


def _check_transition(index: int, source: int, before: ModelConfig, after: ModelConfig) -> None:
    """A stage starts from stage `source`'s weights: every shape change between the two needs a resize rule
    (vlmo_ds.train.transition). The relative table needs none for text (its text rows are sized by
    model.table_text_len) and has BEiT's interpolation for images; absolute image positions are interpolated;
    absolute text positions can be cut, not grown."""
    if not after.rel_pos and after.max_text_len > before.max_text_len:
        raise ConfigError(f"stages.{index}.text_len: {after.max_text_len} is longer than stages.{source}'s "
                          f"{before.max_text_len}, and absolute text positions (model.rel_pos=false) have no rule to "
                          f"grow; keep stages.{index}.text_len <= {before.max_text_len} or set "
                          f"stages.{index}.init_from to a weights file")


def validate(cfg: RunConfig, ds: dict[str, Any], world_size: int | None = None) -> None:
    """Raise ConfigError for the first problem of `cfg` (`ds`: its DeepSpeed JSON; world_size: ranks, if known)."""
    if not cfg.run_dir:
        raise ConfigError("run_dir: empty; give a folder for checkpoints and logs")
    if not cfg.tokenizer:
        raise ConfigError("tokenizer: empty; give a sentencepiece *.model or a BERT vocab.txt")
    _positive(cfg.seed, "seed", allow_zero=True)
    if cfg.precision not in ("fp32", "bf16"):
        why = " (fp16 needs loss scaling, which vlmo_ds does not do)" if cfg.precision == "fp16" else ""
        raise ConfigError(f"precision: '{cfg.precision}' is not supported; use 'bf16' (GPUs with bf16) or 'fp32'{why}")
    if world_size is not None and world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    _positive(cfg.parallel.tensor, "parallel.tensor")
    _positive(cfg.parallel.pipeline, "parallel.pipeline")
    _check_model(cfg)
    _check_parallel(cfg, ds, world_size)
    _check_optim(cfg)
    _check_train(cfg)
    names: dict[str, int] = {}
    for index, stage in enumerate(cfg.stages):
        if stage.name in names:
            raise ConfigError(f"stages.{index}.name: duplicate stage name '{stage.name}' "
                              f"(also stages.{names[stage.name]}.name); give each stage a unique name")
        names[stage.name] = index
        _check_stage(cfg, index, stage, world_size)
    only = cfg.train.only_stage
    if only is not None and only not in names:
        raise ConfigError(f"train.only_stage: no stage '{only}'{did_you_mean(only, names)}; stages: "
                          f"{', '.join(names)}")
