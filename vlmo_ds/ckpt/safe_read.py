"""Reading checkpoint files without running code from them, and with one clear error for a truncated file.

torch files load with weights_only=True only. DeepSpeed's ZeRO optimizer files hold three small objects besides
tensors (its loss scaler, the ZeRO stage enum and the fragment address of each parameter slice); weights-only
loading maps exactly those names onto inert stand-ins here (`Fields`: their attributes, nothing callable; the stage
enum becomes its int), so no DeepSpeed class is ever built from a file and any other object is still refused.
DeepSpeed's own resume loads take its real classes instead (`allowed`, vlmo_ds.ckpt.weights_only_engine).
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.serialization import safe_globals

from vlmo_ds.ckpt.errors import CheckpointError


class Fields:
    """The attributes of an object from a DeepSpeed file (a fragment address: start, numel; a loss scaler)."""

    def __repr__(self) -> str:
        return f"Fields({vars(self)})"


class _LossScaler(Fields):
    pass


class _FragmentAddress(Fields):
    pass


STAND_INS = [(_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
                    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),
                    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address")]
_BROKEN = (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError)


def _missing(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} does not exist; check the path (a checkpoint folder is step_NNNNNNNN under "
                           "RUN_DIR/checkpoints)")


def broken(path: Path, err: BaseException) -> CheckpointError:
    """The error for a file that exists but cannot be read whole."""
    text = str(err).strip()
    reason = text.splitlines()[0].split(". ")[0][:120] if text else type(err).__name__
    return CheckpointError(f"{path} is truncated or corrupt ({reason}); copy it again from its source or use an "
                           "older checkpoint")


def load_torch(path: str | Path, mmap: bool = False, allowed: list = STAND_INS, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True), with the objects `allowed` names (default: DeepSpeed's three as stand-ins).
    mmap: map the tensors instead of reading them (cheap when only shapes are wanted)."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            found = re.search(r"GLOBAL (\S+)", str(err))
            what = f"it holds {found.group(1)}, which is not a tensor" if found else "it needs more than tensors"
            raise CheckpointError(f"refusing to unpickle {path}: {what}; only weights-only files load here (use "
                                  "another checkpoint, or convert this one to safetensors where you trust it)"
                                  ) from None
        raise broken(path, err) from None
    except _BROKEN as err:
        raise broken(path, err) from None


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise broken(path, err) from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Only the header metadata (cheap: no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise broken(path, err) from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise broken(path, err) from None
