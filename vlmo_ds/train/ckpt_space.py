"""Disk space for checkpoints: a save that does not fit stops the run with one line saying how much is free and how
much one checkpoint needs, instead of torch's `unexpected pos ...` traceback from a half-written file.

What one checkpoint needs: the size of the newest complete one (the same model and layout write the same files), or,
before the first, an estimate from the parameter and optimizer bytes (each parameter in its dtype, plus float32 master
weights and two AdamW moments per trainable one, times the model-parallel ranks). Before a save rank 0 compares it
with the free space of the checkpoint folder and every rank stops when it does not fit (nothing is written; the
previous checkpoints stay). A write that fails anyway (the disk filled during the save, a quota) gives the same line;
its partial step_*.tmp folder is removed when the run starts again.
"""
from __future__ import annotations

import errno
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from vlmo_ds.ckpt.errors import CheckpointError

OPTIMIZER_BYTES = 12
"""Per trainable parameter: a float32 master weight and AdamW's two float32 moments."""
WRITE_FAILED = re.compile(r"unexpected pos|failed writing|write failed", re.IGNORECASE)
"""torch's messages for a write that did not complete (its C++ writer drops the OS error)."""


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def needed_bytes(engine, previous: Path | None) -> tuple[int, str]:
    """(bytes one checkpoint needs, how that was found): the size of `previous`, else the estimate."""
    if previous is not None:
        return sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()), f"the size of {previous.name}"
    per_rank = 0
    for param in engine.module.parameters():
        count = getattr(param, "ds_numel", param.numel())  # ZeRO 3 keeps only a partition in the parameter
        per_rank += count * (param.element_size() + (OPTIMIZER_BYTES if param.requires_grad else 0))
    return per_rank * engine.mp_world_size, "estimated from the parameter and optimizer bytes"


def _free(root: Path) -> int:
    """Free bytes on the file system that will hold `root` (it and its run folder may not exist yet)."""
    existing = next(path for path in (root, *root.absolute().parents) if path.exists())
    return shutil.disk_usage(existing).free


def _message(root: Path, what: str, free: int, needed: tuple[int, str], previous: Path | None) -> str:
    resume = f"it resumes from {previous.name}" if previous else "it starts again"
    return (f"{what}: {_size(free)} free in {root}, one checkpoint needs about {_size(needed[0])} ({needed[1]}); "
            f"free space there (or lower train.keep_last, or move run_dir) and run the same command again: {resume}")


def check_space(engine, root: Path, previous: Path | None, rank: int) -> None:
    """Every rank, before a save: one CheckpointError on every rank when rank 0 finds too little free space."""
    message = None
    if rank == 0:
        needed, free = needed_bytes(engine, previous), _free(root)
        if free < needed[0]:
            message = _message(root, "not enough disk space for a checkpoint", free, needed, previous)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise CheckpointError(message)


@contextmanager
def write_errors(engine, root: Path, previous: Path | None) -> Iterator[None]:
    """A write that fails inside the block (the OS error, or torch's report of it) becomes one CheckpointError."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not WRITE_FAILED.search(str(err)):
            raise
        if isinstance(err, OSError):
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = "no space left on the device" if full else (err.strerror or type(err).__name__)
        else:
            reason = "a write failed: a full disk or a quota?"
        raise CheckpointError(_message(root, f"could not write the checkpoint ({reason})", _free(root),
                                       needed_bytes(engine, previous), previous)) from None
