"""Honest resume: a checkpoint records the recipe its stage was trained with, and a resume under another recipe is
refused with one line that lists the changed fields (old -> new) and the fix, unless train.allow_resume_changes
accepts them.

trainer.json keeps, beside the "model" (ModelConfig) it already names, a "recipe": the resolved settings of the
checkpoint's stage that change what it computes, and the stage's "lr_schedule" (vlmo_ds.train.optim.LrSchedule), so
that a decay re-planned at one resume stays so at the next.
What a resume may change, and only when train.allow_resume_changes names it:
    steps         down to the steps the stage has trained (fewer are always refused: the stage's record would claim
                  fewer steps than were trained); the decay is re-planned from the checkpoint's step to the new end
    global_batch  the data order continues; each step takes the new number of samples
    schedule      lr, warmup, end_lr: the new schedule applies from the checkpoint's step
Everything else (micro_batch, data sources and weights, image size, text length, seed, model, the stage's kind and
trainable set, the steps of the stages before it) is fixed inside a stage: the data position, the random streams,
the optimizer state or the step numbering depend on it. The layout and the model's shapes are checked before this,
by vlmo_ds.train.checkpoint.check_layout (which points at the resharding tool) and ckpt.layout.check_resume_model.
A checkpoint written before recipes were recorded resumes with a warning.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.config import RunConfig, StagePlan
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.train.checkpoint import TRAINER_FILE
from vlmo_ds.train.optim import LrSchedule

ACCEPTABLE = {"steps": "steps", "global_batch": "global_batch", "lr": "schedule", "warmup": "schedule",
              "end_lr": "schedule"}
"""Recipe fields a resume may change, and the train.allow_resume_changes name that accepts each."""
STAGE_SETTINGS = ("image_size", "max_text_len")
"""ModelConfig fields a stage sets (recorded in the recipe as image_size and text_len)."""


def recipe_of(cfg: RunConfig, plan: StagePlan, steps_before: int) -> dict[str, Any]:
    """What trainer.json records as "recipe" for the stage of `plan` (JSON values)."""
    stage = plan.stage
    recipe = {"steps": stage.steps, "steps_before": steps_before, "global_batch": plan.global_batch,
              "micro_batch": plan.micro_batch, "lr": plan.lr,
              "warmup": stage.warmup if stage.warmup is not None else cfg.optim.warmup, "end_lr": plan.end_lr,
              "data": [[source.shards, source.weight] for source in stage.data], "image_size": plan.image_size,
              "text_len": plan.text_len, "seed": cfg.seed, "preset": cfg.model.preset, "kind": stage.kind,
              "trainable": stage.trainable}
    return json.loads(json.dumps(recipe))


def _changes(saved: dict[str, Any], recipe: dict[str, Any], model: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """field -> (recorded, this run) for every difference between trainer.json `saved` and this run."""
    found = {key: (saved["recipe"].get(key), value) for key, value in recipe.items()
             if saved["recipe"].get(key) != value}
    saved_model = saved.get("model", {})
    current = json.loads(json.dumps(dataclasses.asdict(model)))
    found |= {f"model.{key}": (saved_model[key], value) for key, value in current.items()
              if key not in STAGE_SETTINGS and saved_model.get(key, value) != value}
    return found


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())


def _refusal(path: Path, stage: str, done: int, changes: dict[str, tuple[Any, Any]], below: bool,
             allowed: tuple[str, ...]) -> str:
    """The one line refusing `changes`, with a fix for each kind (below: fewer steps than `done` were trained)."""
    fixes = []
    if below:
        fixes.append(f"this stage has trained {done} steps: set its steps to at least {done}")
    wanted = sorted({ACCEPTABLE[key] for key in changes if key in ACCEPTABLE and not (below and key == "steps")}
                    - set(allowed))
    if wanted:
        fixes.append(f"to accept {' and '.join(wanted)} changes, pass train.allow_resume_changes="
                     f"{','.join(sorted(set(allowed) | set(wanted)))}")
    fixed = [key for key in changes if key not in ACCEPTABLE]
    if fixed:
        fixes.append(f"{', '.join(fixed)} cannot change inside a stage: set {'it' if len(fixed) == 1 else 'them'} "
                     f"back, or start the stage again with train.resume=none --stage {stage}")
    return f"{path} was trained with another recipe for stage '{stage}': {_listed(changes)}; {'; '.join(fixes)}"


def check_resume(path: Path, recipe: dict[str, Any], model: ModelConfig, fresh: LrSchedule,
                 allowed: tuple[str, ...]) -> tuple[LrSchedule, str | None]:
    """The learning-rate schedule to resume checkpoint `path` with, and a line to log (an accepted change, or a
    checkpoint that records no recipe); a CheckpointError (one line) when the recipe differs in a way `allowed`
    (train.allow_resume_changes) does not accept. `fresh`: this run's schedule of the stage from its start."""
    saved = json.loads((path / TRAINER_FILE).read_text())
    stage = saved.get("stage", "?")
    if "recipe" not in saved:
        return fresh, (f"{path} records no recipe (written by an older vlmo_ds): resuming without checking that "
                       "batch, steps, schedule, data, seed and model are unchanged")
    done = saved["stage_step"]
    changes = _changes(saved, recipe, model)
    below = "steps" in changes and changes["steps"][1] < done
    if below or any(ACCEPTABLE.get(key) not in allowed for key in changes):
        raise CheckpointError(_refusal(path, stage, done, changes, below, allowed))
    recorded = LrSchedule(**saved["lr_schedule"])
    if not changes:
        return recorded, None
    if any(ACCEPTABLE[key] == "schedule" for key in changes):
        schedule = fresh
        how = f"the new schedule applies from step {done} (lr {fresh.at(done):.3g}, was {recorded.at(done):.3g})"
    elif "steps" in changes:
        schedule = recorded.replanned(done, recipe["steps"])
        how = (f"the learning rate now decays from {schedule.at(done):.3g} at stage step {done} to "
               f"{schedule.end:.3g} at stage step {schedule.total} (was {recorded.total})")
    else:
        schedule, how = recorded, "the learning-rate schedule is unchanged"
    return schedule, (f"{path}: stage '{stage}' resumes at stage step {done} with the changes "
                      f"train.allow_resume_changes accepts: {_listed(changes)}; {how}")
