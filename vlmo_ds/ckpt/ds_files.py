"""DeepSpeed's checkpoint files of one model-parallel rank, read back into whole fp32 tensors by parameter name.

A vlmo_ds checkpoint folder (RUN_DIR/checkpoints/step_N) holds, per model-parallel rank XX (one TP x PP shard of the
model, XX = tp + T * pp) and data-parallel rank d (DeepSpeed 0.19, read from engine.py and the ZeRO optimizers):
    ZeRO 0    mp_rank_XX_model_states.pt: "module" (the weights in the compute dtype) and "optimizer": the torch AdamW
              state dict (fp32), or in bf16 DeepSpeed's unfused optimizer {"optimizer_state_dict", "fp32_groups":
              the fp32 masters}; parameters are numbered in optimizer-group order, no names are stored
    ZeRO 1-2  mp_rank_XX_model_states.pt ("module" in the compute dtype, "param_shapes": the trainable names per
              flat group) and [bf16_]zero_pp_rank_d_mp_rank_XX_optim_states.pt: rank d's slice of every flat group
              ("single_partition_of_fp32_groups", the masters), the AdamW state of those slices and
              "param_slice_mappings" (name -> start, numel of each parameter's piece in the slice)
    ZeRO 3    zero_pp_rank_d_mp_rank_XX_model_states.pt ("param_shapes", frozen parameters as per-rank fragments)
              and the optim file with "fp32_flat_groups": every parameter cut into ceil(numel / D) pieces, piece d
              on rank d, concatenated in param_shapes order within each sub-group
The masters are taken wherever they exist (bf16 runs); frozen parameters and buffers come from the module as saved.
Shapes: N a parameter's element count, D data-parallel ranks.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.ckpt.safe_read import load_torch
from vlmo_ds.train.optim import decays

_MODEL = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_HYPER = ("name", "lr", "betas", "eps", "weight_decay")


@dataclass
class RankState:
    """One model-parallel rank, whole across its data-parallel partitions."""

    weights: dict[str, torch.Tensor]
    """Every parameter and persistent buffer, float32 (the optimizer's masters where it keeps them)."""
    exp_avg: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    step: dict[str, float] = field(default_factory=dict)
    """AdamW's step count per trainable parameter (empty before the first step)."""
    groups: list[dict[str, Any]] = field(default_factory=list)
    """The optimizer's groups: name, lr, betas, eps, weight_decay and "params" (the member names)."""


@dataclass
class DsCheckpoint:
    """The DeepSpeed side of one checkpoint folder."""

    folder: Path
    zero_stage: int
    bf16: bool
    mp_size: int
    dp_size: int
    meta: dict[str, Any]
    """mp rank 0's model file without its tensors: ds_config, global_steps, global_samples, dp_world_size, ..."""

    def model_file(self, mp: int, dp: int = 0) -> Path:
        name = f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt" if self.zero_stage == 3 \
            else f"mp_rank_{mp:02d}_model_states.pt"
        return self.folder / name

    def optim_file(self, mp: int, dp: int) -> Path:
        return self.folder / f"{'bf16_' if self.bf16 else ''}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"


def _meta(state: dict[str, Any]) -> dict[str, Any]:
    keep = ("ds_config", "ds_version", "global_steps", "global_samples", "skipped_steps", "dp_world_size",
            "mp_world_size", "checkpoint_parallel_dimensions")
    return {k: state.get(k) for k in keep}


def open_checkpoint(folder: str | Path) -> DsCheckpoint:
    """Find DeepSpeed's files in `folder` and check that none is missing."""
    folder = Path(folder)
    found = {}
    for path in folder.iterdir() if folder.is_dir() else []:
        if match := _MODEL.match(path.name):
            found.setdefault(int(match.group(2)), []).append(path)
    if not found:
        raise CheckpointError(f"{folder} holds no DeepSpeed model files (mp_rank_XX_model_states.pt); pass a "
                              "checkpoint folder (RUN_DIR/checkpoints/step_NNNNNNNN)")
    mp_size = max(found) + 1
    if sorted(found) != list(range(mp_size)):
        raise CheckpointError(f"{folder} lacks the model files of model-parallel ranks "
                              f"{sorted(set(range(mp_size)) - set(found))}; the checkpoint is incomplete")
    first = min(found[0], key=lambda p: p.name)
    meta = _meta(load_torch(first))
    ds_config = meta.get("ds_config") or {}
    zero = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    bf16 = bool((ds_config.get("bf16") or ds_config.get("bfloat16") or {}).get("enabled", False))
    dp_size = int(meta.get("dp_world_size") or 1)
    ckpt = DsCheckpoint(folder, zero, bf16, mp_size, dp_size, meta)
    needed = [ckpt.model_file(mp, dp) for mp in range(mp_size) for dp in range(dp_size if zero == 3 else 1)]
    needed += [ckpt.optim_file(mp, dp) for mp in range(mp_size) for dp in range(dp_size) if zero > 0]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise CheckpointError(f"{folder} is incomplete: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
                              f" missing (ZeRO {zero}, {mp_size} model-parallel x {dp_size} data-parallel ranks); "
                              "use another checkpoint")
    return ckpt


def _hyper(group: dict[str, Any], names: list[str]) -> dict[str, Any]:
    out = {k: group[k] for k in _HYPER if k in group}
    out["betas"] = list(out.get("betas", (0.9, 0.999)))
    return out | {"params": names}


def _fp32(value: torch.Tensor) -> torch.Tensor:
    return value.detach().float().clone()


def read_rank(ckpt: DsCheckpoint, mp: int, trains: Callable[[str], bool] | None = None) -> RankState:
    """Model-parallel rank `mp` whole. trains(name): whether a parameter trains (needed only for a ZeRO 0
    checkpoint whose stage froze parameters: its optimizer stores no names; None: every parameter)."""
    model = load_torch(ckpt.model_file(mp))
    module = model.get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{ckpt.model_file(mp)} has no 'module' weights; it was not written by "
                              "DeepSpeed's save_checkpoint")
    if ckpt.zero_stage == 0:
        return _zero0(ckpt, mp, model, trains)
    states = [load_torch(ckpt.optim_file(mp, dp))["optimizer_state_dict"]
              for dp in tqdm(range(ckpt.dp_size), desc=f"mp rank {mp}: ZeRO partitions", leave=False,
                             disable=None)]
    shapes: list[dict[str, torch.Size]] = model["param_shapes"]
    out = _zero3(ckpt, mp, model, states, shapes) if ckpt.zero_stage == 3 else _zero12(model, states, shapes)
    for name in model.get("buffer_names") or []:
        out.weights[name] = _fp32(module[name])
    return out


def _adam_groups(base: dict[str, Any], shapes: list[dict[str, torch.Size]]) -> list[dict[str, Any]]:
    """The torch optimizer's groups, each listing the flat groups (indices into `shapes`) it steps."""
    return [_hyper(g, [n for i in g["params"] for n in shapes[i]]) | {"flats": list(g["params"])}
            for g in base["param_groups"]]


def _zero12(model: dict[str, Any], states: list[dict[str, Any]], shapes: list[dict[str, torch.Size]]) -> RankState:
    out = RankState({k: _fp32(v) for k, v in model["module"].items()})
    base = states[0]["base_optimizer_state"]
    out.groups = _adam_groups(base, shapes)
    keys = ("fp32", "exp_avg", "exp_avg_sq")
    for i, group_shapes in enumerate(shapes):
        pieces: dict[str, dict[str, list[torch.Tensor]]] = {k: {n: [] for n in group_shapes} for k in keys}
        adam = base["state"].get(i, {})
        for rank, state in enumerate(states):
            flats = {"fp32": state["single_partition_of_fp32_groups"][i]}
            flats.update({k: state["base_optimizer_state"]["state"][i][k] for k in keys[1:] if k in adam})
            for name, where in state["param_slice_mappings"][i].items():
                for key, flat in flats.items():
                    pieces[key][name].append(flat.narrow(0, where.start, where.numel))
        for name, shape in group_shapes.items():
            out.weights[name] = _whole(pieces["fp32"][name], shape, name)
            if adam:
                out.exp_avg[name] = _whole(pieces["exp_avg"][name], shape, name)
                out.exp_avg_sq[name] = _whole(pieces["exp_avg_sq"][name], shape, name)
                out.step[name] = float(adam["step"])
    return out


def _whole(pieces: list[torch.Tensor], shape: tuple[int, ...], name: str, padded: bool = False) -> torch.Tensor:
    """The pieces of one tensor, in order, joined and shaped; `padded`: the last piece may run past its end."""
    flat = torch.cat([p.flatten() for p in pieces]) if pieces else torch.empty(0)
    numel = math.prod(shape)
    if flat.numel() < numel or (flat.numel() != numel and not padded):
        raise CheckpointError(f"the ZeRO partitions hold {flat.numel()} values of {name}, whose shape "
                              f"{tuple(shape)} needs {numel}; the optimizer files belong to different saves")
    return flat[:numel].reshape(shape).float().clone()


def _zero3(ckpt: DsCheckpoint, mp: int, model: dict[str, Any], states: list[dict[str, Any]],
           shapes: list[dict[str, torch.Size]]) -> RankState:
    out = RankState({})
    base = states[0]["optimizer_state_dict"]
    out.groups = _adam_groups(base, shapes)
    d = ckpt.dp_size
    for i, group_shapes in enumerate(shapes):
        adam = base["state"].get(i, {})
        flats = {"fp32": [s["fp32_flat_groups"][i] for s in states]}
        flats.update({k: [s["optimizer_state_dict"]["state"][i][k] for s in states]
                      for k in ("exp_avg", "exp_avg_sq") if k in adam})
        offset = 0
        for name, shape in group_shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / d)  # every rank holds ceil(N / D) values, the last one padded
            whole = {k: _whole([f.narrow(0, offset, part) for f in parts], shape, name, padded=True)
                     for k, parts in flats.items()}
            offset += part
            out.weights[name] = whole["fp32"]
            if adam:
                out.exp_avg[name], out.exp_avg_sq[name] = whole["exp_avg"], whole["exp_avg_sq"]
                out.step[name] = float(adam["step"])
    frozen = model.get("frozen_param_shapes") or {}
    if frozen:
        fragments = [model["frozen_param_fragments"]] + [
            load_torch(ckpt.model_file(mp, dp))["frozen_param_fragments"] for dp in range(1, d)]
        for name, shape in frozen.items():
            out.weights[name] = _whole([f[name] for f in fragments], shape, name, padded=True)
    return out


def _zero0(ckpt: DsCheckpoint, mp: int, model: dict[str, Any], trains: Callable[[str], bool] | None) -> RankState:
    module, saved = model["module"], model.get("optimizer")
    out = RankState({k: _fp32(v) for k, v in module.items()})
    if not saved:
        return out
    unfused = "optimizer_state_dict" in saved  # bf16: DeepSpeed's unfused optimizer around the torch AdamW
    torch_state = saved["optimizer_state_dict"] if unfused else saved
    buffers = set(model.get("buffer_names") or [])
    names = [n for n in module if n not in buffers]
    rule: dict[str, list[str]] = {"decay": [], "no_decay": []}  # vlmo_ds.train.optim.param_groups' rule
    for name in names:
        if trains is None or trains(name):
            rule["decay" if decays(name, torch.empty(module[name].shape, device="meta")) else "no_decay"].append(name)
    order: list[str] = []
    for group in torch_state["param_groups"]:
        members = rule.get(group.get("name"), [])
        if len(members) != len(group["params"]):
            raise CheckpointError(
                f"{ckpt.model_file(mp)}: the ZeRO 0 optimizer's group {group.get('name')!r} steps "
                f"{len(group['params'])} parameters but {len(members)} fit it; the stage froze parameters, and ZeRO 0 "
                "stores no names: pass --trainable GROUP,... (the stage's trainable list, e.g. text_embeddings,"
                "text_experts) so that its optimizer state can be matched")
        order += members
        out.groups.append(_hyper(group, members))
    masters = [t for group in saved["fp32_groups"] for t in group] if unfused else None
    for index, name in enumerate(order):
        if masters is not None:
            out.weights[name] = _fp32(masters[index])
        adam = torch_state["state"].get(index)
        if adam:
            out.exp_avg[name], out.exp_avg_sq[name] = _fp32(adam["exp_avg"]), _fp32(adam["exp_avg_sq"])
            out.step[name] = float(adam["step"])
    return out
