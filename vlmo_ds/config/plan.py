"""What the trainer asks of a loaded RunConfig: the ModelConfig to build, and each stage's resolved numbers.

A stage inherits lr, warm-up and batch sizes from optim / train unless it overrides them, and its image size and
text length from the model; StagePlan holds the result, with the gradient accumulation derived from the
data-parallel size, so the trainer never repeats the fallback rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vlmo_ds.config.errors import ConfigError
from vlmo_ds.config.schema import RunConfig, StageConfig
from vlmo_ds.model.config import NLVR2_MODALITY_TYPES, PRESETS, ModelConfig


def find_stage(cfg: RunConfig, stage: int | str) -> tuple[int, StageConfig]:
    """(index, stage) for a stage index or name."""
    for index, item in enumerate(cfg.stages):
        if stage == index or stage == item.name:
            return index, item
    raise ConfigError(f"stages: no stage {stage!r}; stages are {', '.join(s.name for s in cfg.stages)}")


def resume_changes(cfg: RunConfig) -> tuple[str, ...]:
    """train.allow_resume_changes as names ("steps,global_batch" or a list)."""
    value = cfg.train.allow_resume_changes
    names = value.split(",") if isinstance(value, str) else value
    return tuple(name.strip() for name in names if name.strip())


def start_stage(cfg: RunConfig, index: int) -> int | None:
    """The index of the stage whose final weights stage `index` starts from: the one init_from names, else the
    previous one; None for the first stage and for init_from files."""
    init_from = cfg.stages[index].init_from
    if init_from is None:
        return index - 1 if index > 0 else None
    names = [s.name for s in cfg.stages]
    if init_from not in names:
        return None
    at = names.index(init_from)
    if at >= index:
        raise ConfigError(f"stages.{index}.init_from: stage '{init_from}' does not run before stage "
                          f"'{cfg.stages[index].name}'; name an earlier stage or a weights file")
    return at


def model_value(cfg: RunConfig, name: str) -> Any:
    """A ModelConfig field as the recipe sets it (override, else the preset's value)."""
    if name in cfg.model.overrides:
        return cfg.model.overrides[name]
    return getattr(PRESETS[cfg.model.preset], name)


def vocab_stand_in(cfg: RunConfig) -> int | None:
    """A vocabulary size for vocab_size "auto" before the tokenizer exists (divisible by any valid tensor size)."""
    return 1024 * cfg.parallel.tensor if model_value(cfg, "vocab_size") == "auto" else None


def _model_error(err: ValueError, keys: dict[str, str]) -> ConfigError:
    """ModelConfig's own ValueError as a ConfigError led by the recipe keys it names (model.dim, stages.0.text_len)."""
    named = [keys.get(name, f"model.{name}") for name in re.findall(r"\b([a-z_]+)=", str(err))]
    lead = " / ".join(dict.fromkeys(named)) or "model"
    return ConfigError(f"{lead}: {err}")


def model_config(cfg: RunConfig, vocab_size: int | None = None, stage: int | str | None = None) -> ModelConfig:
    """The ModelConfig of a run, of one stage when `stage` is given (its image_size / text_len / drop_path_rate /
    mim_target applied; the MIM head only in image_mim stages; the third modality type row in nlvr2 stages).

    vocab_size is the tokenizer's size: it replaces a recipe's "auto" and must not exceed a fixed model.vocab_size.
    """
    section = cfg.model
    if section.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset '{section.preset}'; presets: {', '.join(PRESETS)}")
    fields = dict(section.overrides)
    keys: dict[str, str] = {}
    vocab = fields.get("vocab_size", PRESETS[section.preset].vocab_size)
    if vocab == "auto":
        if vocab_size is None:
            raise ConfigError("model.vocab_size: 'auto' takes the tokenizer's size; pass the tokenizer's vocab_size")
        fields["vocab_size"] = vocab = vocab_size
    elif vocab_size is not None and vocab < vocab_size:
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than the tokenizer's {vocab_size} tokens; "
                          f"set model.vocab_size=auto or at least {vocab_size}")
    tensor = cfg.parallel.tensor
    if vocab % tensor:
        padded = -(-vocab // tensor) * tensor
        raise ConfigError(f"model.vocab_size: {vocab} is not divisible by parallel.tensor={tensor}; "
                          f"set model.vocab_size={padded} (padded) or change parallel.tensor")
    if stage is not None:
        index, item = find_stage(cfg, stage)
        # The MIM head exists only where a stage trains it: other stages neither carry nor decay it.
        if item.kind != "image_mim":
            fields["mim_targets"] = None
        elif item.mim_target is not None:
            fields["mim_targets"] = item.mim_target
            keys["mim_targets"] = f"stages.{index}.mim_target"
        if item.kind == "nlvr2":
            fields["num_modality_types"] = max(NLVR2_MODALITY_TYPES, fields.get("num_modality_types", 2))
        if item.image_size is not None:
            fields["image_size"] = item.image_size
            keys["image_size"] = f"stages.{index}.image_size"
        if item.text_len is not None:
            fields["max_text_len"] = item.text_len
            keys["max_text_len"] = f"stages.{index}.text_len"
        if item.drop_path_rate is not None:
            fields["drop_path_rate"] = item.drop_path_rate
            keys["drop_path_rate"] = f"stages.{index}.drop_path_rate"
    try:
        return PRESETS[section.preset].replace(**fields)
    except ValueError as err:
        raise _model_error(err, keys) from None


@dataclass(frozen=True)
class StagePlan:
    """One stage's numbers after the fallbacks to optim / train / model are applied."""

    index: int
    """Position in cfg.stages."""
    stage: StageConfig
    """The stage as configured."""
    lr: float
    """Peak learning rate."""
    end_lr: float
    """Learning rate at the last step."""
    warmup_steps: int
    """Linear warm-up steps (a fractional warm-up is floor(fraction x steps), as the published code does)."""
    micro_batch: int
    """Samples per data-parallel rank per forward pass."""
    global_batch: int
    """Samples per optimizer step."""
    accumulation: int
    """Micro-batches accumulated per optimizer step on each rank."""
    image_size: int
    """Image resolution."""
    text_len: int
    """Padded text length."""


def warmup_steps(warmup: float | int, steps: int) -> int:
    """A warm-up fraction (float) or step count (int) as steps."""
    return int(warmup * steps) if isinstance(warmup, float) else warmup


def stage_batches(cfg: RunConfig, stage: StageConfig) -> tuple[int, int]:
    """(micro_batch, global_batch) of a stage."""
    micro = stage.micro_batch if stage.micro_batch is not None else cfg.train.micro_batch
    total = stage.global_batch if stage.global_batch is not None else cfg.train.global_batch
    return micro, total


def accumulation(cfg: RunConfig, stage: int | str, dp_size: int) -> int:
    """Gradient accumulation steps = global_batch / (micro_batch x dp_size); a ConfigError if that is no integer."""
    index, item = find_stage(cfg, stage)
    micro, total = stage_batches(cfg, item)
    where = f"stages.{index}" if item.global_batch is not None or item.micro_batch is not None else "train"
    if dp_size < 1 or total % (micro * dp_size):
        raise ConfigError(f"{where}.global_batch: {total} is not divisible by micro_batch x data-parallel ranks = "
                          f"{micro} x {dp_size} = {micro * dp_size}; set {where}.global_batch to a multiple of "
                          f"{micro * dp_size} or change {where}.micro_batch")
    return total // (micro * dp_size)


def stage_plan(cfg: RunConfig, stage: int | str, dp_size: int) -> StagePlan:
    """The resolved numbers of one stage for a run with `dp_size` data-parallel ranks."""
    index, item = find_stage(cfg, stage)
    micro, total = stage_batches(cfg, item)
    warmup = item.warmup if item.warmup is not None else cfg.optim.warmup
    return StagePlan(
        index=index,
        stage=item,
        lr=item.lr if item.lr is not None else cfg.optim.lr,
        end_lr=cfg.optim.end_lr,
        warmup_steps=warmup_steps(warmup, item.steps),
        micro_batch=micro,
        global_batch=total,
        accumulation=accumulation(cfg, index, dp_size),
        image_size=item.image_size if item.image_size is not None else model_value(cfg, "image_size"),
        text_len=item.text_len if item.text_len is not None else model_value(cfg, "max_text_len"),
    )
