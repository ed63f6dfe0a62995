"""The stage scheduler: which stages a run (or a job of a chain) runs, where each starts, and the run folder's
bookkeeping between them.

    train.resume=auto  finished stages (RUN_DIR/stages/<name>/stage.json) are never re-run; the first unfinished
                       stage continues from its newest checkpoint (RUN_DIR/checkpoints, trainer.json names the
                       stage) or starts afresh; the stages after it follow in order.
    train.resume=none  every stage runs again from the first (or only the one train.only_stage names).
    train.resume=PATH  continue from that checkpoint, in the stage it belongs to, then run the stages after it.
    train.only_stage   (--stage NAME) run one stage, then exit: a chain of jobs runs one stage per job. A stage that
                       is already finished is a no-op (a re-queued job does no harm).
A stage starting afresh takes its start weights from `init_from` (an earlier stage's record or a file) if set,
else from the previous stage's record, else (the first stage) from initialisation. When a stage starts or
continues, everything recorded for later stages is stale and is removed (their checkpoints and records); a fresh
start also removes the stage's own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vlmo_ds.config import ConfigError, RunConfig, start_stage
from vlmo_ds.train import checkpoint, stage_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """The stages one invocation runs: indices [first, stop), the first possibly continuing from a checkpoint."""

    first: int
    stop: int
    resume_from: Path | None
    finished: tuple[str, ...]
    """Stages already finished in the run folder (empty under resume=none)."""


def _explicit_resume(cfg: RunConfig, names: list[str], finished: tuple[str, ...]) -> RunPlan:
    path = checkpoint.find_resume(cfg.run_dir, cfg.train.resume)
    name = checkpoint.stage_of(path) or names[0]
    if name not in names:
        raise ConfigError(f"train.resume: {path} belongs to stage '{name}', which this recipe does not have "
                          f"(stages: {', '.join(names)})")
    only = cfg.train.only_stage
    if only is not None and only != name:
        raise ConfigError(f"train.resume: {path} belongs to stage '{name}' but train.only_stage={only}; "
                          "drop one of the two")
    index = names.index(name)
    return RunPlan(index, index + 1 if only else len(names), path, finished)


def plan_run(cfg: RunConfig) -> RunPlan:
    """What to run, from the recipe and the run folder; a ConfigError (one line) when a stage cannot start."""
    names = [stage.name for stage in cfg.stages]
    resume, only = cfg.train.resume, cfg.train.only_stage
    finished = tuple(n for n in names if stage_record.is_finished(cfg.run_dir, n)) if resume != "none" else ()
    if resume not in ("auto", "none"):
        return _explicit_resume(cfg, names, finished)
    if only is not None:
        first = names.index(only)
        if only in finished:
            return RunPlan(len(names), len(names), None, finished)
        stop = first + 1
    else:
        first = next((i for i, n in enumerate(names) if n not in finished), len(names))
        stop = len(names)
    if first < stop:
        _check_start_weights(cfg, first)
    resume_from = checkpoint.newest_of_stage(cfg.run_dir, names[first]) if first < stop and resume == "auto" else None
    return RunPlan(first, stop, resume_from, finished)


def _check_start_weights(cfg: RunConfig, index: int) -> None:
    source = start_stage(cfg, index)
    if source is None:
        return
    stage, before = cfg.stages[index], cfg.stages[source].name
    if not stage_record.is_finished(cfg.run_dir, before):
        raise ConfigError(f"stages.{index}: stage '{stage.name}' starts from the final weights of stage '{before}', "
                          f"which has not finished in {cfg.run_dir} (no stages/{before}/stage.json); run it first "
                          f"(--stage {before}) or set stages.{index}.init_from to a weights file")


def start_weights(cfg: RunConfig, index: int) -> Path | None:
    """The weights a fresh start of stage `index` loads: the record of the stage init_from names (else of the
    previous stage), or the init_from file; None for a first stage without init_from."""
    source = start_stage(cfg, index)
    if source is not None:
        return stage_record.stage_dir(cfg.run_dir, cfg.stages[source].name) / stage_record.WEIGHTS_FILE
    init_from = cfg.stages[index].init_from
    return None if init_from is None else Path(init_from)


def clear_stale(cfg: RunConfig, index: int, fresh: bool) -> None:
    """Rank 0, before stage `index` runs: remove what later stages (and, on a fresh start, this one) left behind."""
    stale = [stage.name for stage in cfg.stages[index + (0 if fresh else 1):]]
    removed = [name for name in stale if stage_record.remove_record(cfg.run_dir, name)]
    removed += [path.name for path in checkpoint.remove_stages(cfg.run_dir, set(stale))]
    if removed:
        log.warning("stage %s %s: removed the stale records and checkpoints %s", cfg.stages[index].name,
                    "starts afresh" if fresh else "continues", ", ".join(removed))
