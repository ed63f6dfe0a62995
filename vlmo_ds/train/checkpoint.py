"""Checkpoints that are never half-written, and finding the one to resume from.

Layout under RUN_DIR/checkpoints/:
    step_00001200/            one checkpoint: DeepSpeed's files + trainer.json (global) + rank_<r>.pt (per rank);
                              the number is the global step (all stages so far), trainer.json names the stage,
                              the layout it was saved in ("layout": tensor, pipeline, data, zero_stage) and the
                              ModelConfig ("model"), which the checkpoint tools (vlmo_ds.ckpt) read to consolidate
    step_00001200.tmp/        a save in progress (or killed mid-way): never resumed from, removed on the next start
    latest                    the name of the newest complete checkpoint; moved last, atomically
DeepSpeed's files per model-parallel rank XX (= tensor rank + TP x pipeline rank, megatron's order) and data-parallel
rank d: ZeRO 0-2 write mp_rank_XX_model_states.pt (data rank 0), ZeRO 1-2 add zero_pp_rank_d_mp_rank_XX_optim_states.pt,
ZeRO 3 writes zero_pp_rank_d_mp_rank_XX_model_states.pt and ..._optim_states.pt (the partitions). A checkpoint resumes
in the layout it was saved in only (check_layout); tools/ckpt.py reshard converts it to another.
A save writes everything under the .tmp name, waits for every rank, then rank 0 renames the folder and only then
rewrites `latest`. A crash at any point leaves the previous checkpoint as the newest complete one.
Per-rank state (loader position, RNG states) is a torch file of plain tensors and strings. Every file of a resume is
read weights-only, DeepSpeed's included (vlmo_ds.ckpt.weights_only_engine): a file that needs more is refused.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vlmo_ds.ckpt.safe_read import load_torch
from vlmo_ds.ckpt.weights_only_engine import weights_only_loads
from vlmo_ds.parallel.layout_rules import LayoutError
from vlmo_ds.train.ckpt_space import check_space, write_errors

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_FILE = "trainer.json"


def root_of(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": json.dumps([keys.tolist(), pos, has_gauss, gauss]),
             "python": json.dumps(random.getstate(), default=list)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = json.loads(state["numpy"])
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str | Path, step: int, trainer: dict[str, Any], per_rank: dict[str, Any], rank: int,
         keep_last: int) -> Path:
    """Every rank calls this. trainer: global state (rank 0's is written); per_rank: this rank's loader state etc."""
    root = root_of(run_dir)
    name = f"step_{step:08d}"
    tmp = root / f"{name}.tmp"
    previous = find_resume(run_dir, "auto")
    check_space(engine, root, previous, rank)  # a checkpoint that does not fit stops every rank with one line
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    with write_errors(engine, root, previous):
        engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
        torch.save({"loader": json.dumps(per_rank["loader"]), "rng": rng_state()}, tmp / f"rank_{rank}.pt")
    _barrier()
    final = root / name
    if rank == 0:
        with write_errors(engine, root, previous):
            (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=1))
        if final.exists():  # the same step saved again (a resumed run that re-reached it): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", name)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return path.is_dir() and STEP_DIR.match(path.name) is not None and (path / TRAINER_FILE).is_file()


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: resume="none" -> None; "auto" -> the newest complete one (None if there is
    none); otherwise the path given, which must be a complete checkpoint folder."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint folder (step_NNNNNNNN with "
                                    f"{TRAINER_FILE}); use resume=auto to take the newest in the run folder")
        return path
    root = root_of(run_dir)
    if not root.is_dir():
        return None
    pointer = root / "latest"
    name = pointer.read_text().strip() if pointer.is_file() else ""
    # `latest` names a folder beside it, nothing else (a name like ../../step_... would leave the run folder)
    candidate = root / name if STEP_DIR.match(name) and is_complete(root / name) else None
    complete = sorted(p for p in root.iterdir() if is_complete(p))
    newest = complete[-1] if complete else None
    return newest if candidate is None or (newest and newest.name > candidate.name) else candidate


def stage_of(path: Path) -> str | None:
    """The stage a complete checkpoint belongs to (trainer.json "stage"); None if it names none."""
    return json.loads((path / TRAINER_FILE).read_text()).get("stage")


def newest_of_stage(run_dir: str | Path, stage: str) -> Path | None:
    """The newest complete checkpoint of `stage` in the run folder (names sort by global step), None if none."""
    root = root_of(run_dir)
    found = [p for p in root.iterdir() if is_complete(p) and stage_of(p) == stage] if root.is_dir() else []
    return max(found, key=lambda p: p.name) if found else None


def remove_stages(run_dir: str | Path, stages: set[str]) -> list[Path]:
    """Rank 0: delete the checkpoints of these stages (stale once an earlier stage starts again)."""
    root = root_of(run_dir)
    doomed = [p for p in root.iterdir() if is_complete(p) and stage_of(p) in stages] if root.is_dir() else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def remove_partial(run_dir: str | Path) -> None:
    """Rank 0 at start-up: drop saves that were killed mid-way."""
    root = root_of(run_dir)
    for tmp in root.glob("step_*.tmp") if root.is_dir() else []:
        log.warning("removing the incomplete checkpoint %s (a save was interrupted)", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


RESHARD_TOOL = "python tools/ckpt.py reshard"


def _describe_layout(layout: dict[str, int]) -> str:
    return " x ".join(f"{key} {layout[key]}" for key in ("tensor", "pipeline", "data", "zero_stage") if key in layout)


def check_layout(path: Path, layout: dict[str, int]) -> None:
    """A one-line LayoutError when checkpoint `path` was saved in another layout than `layout` (tensor, pipeline,
    data, zero_stage): DeepSpeed's files hold one model-parallel shard and one ZeRO partition per rank. A checkpoint
    from before layouts were recorded counts as tensor 1 x pipeline 1 (its data size is checked by its rank files)."""
    saved = json.loads((path / TRAINER_FILE).read_text()).get("layout", {"tensor": 1, "pipeline": 1})
    if any(key in saved and saved[key] != value for key, value in layout.items()):
        raise LayoutError(f"checkpoint {path} was saved in layout {_describe_layout(saved)}, this run is "
                         f"{_describe_layout(layout)}; run in the saved layout (parallel.tensor, parallel.pipeline, "
                         f"parallel.zero_stage, the number of ranks), or convert the checkpoint with "
                         f"`{RESHARD_TOOL}` and resume from the converted folder")


def load(engine, path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore DeepSpeed's state (weights, optimizer, ZeRO partitions) and return (trainer, this rank's state)."""
    weights_only_loads(engine)
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")
    trainer = json.loads((path / TRAINER_FILE).read_text())
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} is missing: the checkpoint was written by fewer ranks; resume with the "
                                "same number of data-parallel ranks (or start the loaders afresh with resume=none)")
    state = load_torch(rank_file)
    set_rng_state(state["rng"])
    return trainer, {"loader": json.loads(state["loader"])}
