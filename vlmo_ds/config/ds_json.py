"""DeepSpeed JSON files (ds_configs/*.json) and the config dict handed to deepspeed.initialize.

A JSON in ds_configs/ holds what does not depend on the recipe (ZeRO bucket sizes, offload, communication). The
recipe owns the rest, and deepspeed_config() writes it in: train_micro_batch_size_per_gpu,
gradient_accumulation_steps, train_batch_size (from train / the stage and the data-parallel size),
gradient_clipping (optim.grad_clip, always written: DeepSpeed's own default is 1.0), zero_optimization.stage
(parallel.zero_stage) and bf16.enabled (precision). A JSON that sets a recipe-owned field, an optimizer or a
scheduler (vlmo_ds passes a torch AdamW and its own schedule) is refused, so no number lives in two places.
Communication settings that depend on the model (ZeRO bucket sizes, ZeRO-3 prefetch and reuse, gradient data types:
vlmo_ds.config.zero_settings) are derived from the stage's model and layout wherever the JSON leaves them unset.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from vlmo_ds.config.errors import ConfigError, MissingFileError
from vlmo_ds.config.plan import model_config, stage_plan, vocab_stand_in
from vlmo_ds.config.schema import RunConfig
from vlmo_ds.config.zero_settings import with_zero_settings, zero_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIGS = REPO_ROOT / "ds_configs"

RECIPE_OWNED = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / train.micro_batch",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim (the trainer builds AdamW)",
    "scheduler": "optim (the trainer runs its own warm-up and decay)",
}


def resolve_path(path: str, key: str = "deepspeed") -> Path:
    """A DeepSpeed JSON path: absolute, else relative to the working folder, else to the repository root."""
    given = Path(path).expanduser()
    folders = [] if given.is_absolute() else list(dict.fromkeys([Path.cwd(), REPO_ROOT]))
    for candidate in [folder / given for folder in folders] or [given]:
        if candidate.is_file():
            return candidate.resolve()
    shipped = ", ".join(sorted(p.name for p in DS_CONFIGS.glob("*.json"))) or "none found"
    looked = f" (looked in {' and '.join(map(str, folders))})" if folders else ""
    raise MissingFileError(f"{key}: {path} not found{looked}; use one of ds_configs/: {shipped}")


def _strip_comments(node: Any) -> Any:
    """Drop "_comment"-style keys (JSON has no comments; DeepSpeed's nested sections refuse unknown keys)."""
    if isinstance(node, dict):
        return {k: _strip_comments(v) for k, v in node.items() if not str(k).startswith("_")}
    return node


def read_ds_json(path: str | Path, key: str = "deepspeed") -> dict[str, Any]:
    """The JSON's settings without comment keys, checked for recipe-owned fields and unsupported precision."""
    try:
        tree = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise ConfigError(f"{key}: {path} is not valid JSON ({where}: {err.msg})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object")
    tree = _strip_comments(tree)
    for field, owner in RECIPE_OWNED.items():
        if field in tree:
            raise ConfigError(f"{key}: {path} sets '{field}'; remove it, the recipe's {owner} sets it")
    if "bfloat16" in tree:  # DeepSpeed's older spelling of the same section
        tree["bf16"] = tree.pop("bfloat16")
    if (tree.get("fp16") or {}).get("enabled"):
        raise ConfigError(f"{key}: {path} enables fp16, which vlmo_ds does not support (no loss scaling); "
                          "use a *_bf16.json or *_fp32.json config")
    for section in ("zero_optimization", "bf16", "data_types"):
        if not isinstance(tree.get(section, {}), dict):
            raise ConfigError(f"{key}: {path}: '{section}' must be a JSON object")
    enabled = tree.get("bf16", {}).get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{key}: {path}: bf16.enabled must be true or false, got {enabled!r}")
    stage = tree.get("zero_optimization", {}).get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 3:
        raise ConfigError(f"{key}: {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return tree


def json_zero_stage(tree: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed JSON asks for (DeepSpeed's default: 0)."""
    return tree.get("zero_optimization", {}).get("stage", 0)


def json_precision(tree: dict[str, Any]) -> str:
    """'bf16' when the JSON enables bf16, else 'fp32'."""
    return "bf16" if tree.get("bf16", {}).get("enabled", False) else "fp32"


def deepspeed_config(cfg: RunConfig, dp_size: int, stage: int | str = 0) -> dict[str, Any]:
    """The dict for deepspeed.initialize(config=...): cfg.deepspeed's JSON plus the recipe-owned fields of `stage`.

    dp_size is the number of data-parallel ranks (world size / (tensor x pipeline)); each stage may have its own
    batch sizes, so the trainer asks once per stage. Keys the JSON leaves unset get zero_settings() of the stage's
    model (with vocab_size "auto", a stand-in vocabulary: the sizes are heuristics, not exact counts).
    """
    plan = stage_plan(cfg, stage, dp_size)
    par = cfg.parallel
    derived = zero_settings(model_config(cfg, vocab_stand_in(cfg), stage=stage), par.zero_stage,
                            par.tensor * par.pipeline, cfg.precision)
    out = with_zero_settings(copy.deepcopy(read_ds_json(cfg.deepspeed)), derived)
    out["train_micro_batch_size_per_gpu"] = plan.micro_batch
    out["gradient_accumulation_steps"] = plan.accumulation
    out["train_batch_size"] = plan.global_batch
    out["gradient_clipping"] = float(cfg.optim.grad_clip)
    out["zero_optimization"] = {**out.get("zero_optimization", {}), "stage": cfg.parallel.zero_stage}
    out["bf16"] = {**out.get("bf16", {}), "enabled": cfg.precision == "bf16"}
    return out
