"""A checkpoint's parallel layout and model config, and the checks that a checkpoint is the model a user asked for.

Layout: TP x PP x DP ranks with a ZeRO stage. Ranks follow megatron-core's order tp-dp-pp (vlmo_ds.parallel.mpu):
global rank = tp + T * (dp + D * pp); DeepSpeed's model-parallel file index is the rank inside one replica,
mp = tp + T * pp (tensor-parallel ranks fastest). A checkpoint's trainer.json names its layout ("layout": tensor,
pipeline, data, zero_stage) and model ("model": ModelConfig's fields); one without "layout" is TP = PP = 1 with DP and
the ZeRO stage read from DeepSpeed's files, and one without "model" needs --preset (recipe-level fields the weights
show, such as vocab_size, are read from their shapes).

A preset check compares the structural fields (width, depth, heads, FFN ratio, VL blocks, patch, positions, layer
scale); image size, text length and vocabulary are recipe settings and may differ from the preset's.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.model.config import PRESETS, ModelConfig, preset
from vlmo_ds.model.relative_position import window_from_rows

STRUCTURE = ("dim", "depth", "heads", "mlp_ratio", "vlffn_start", "patch_size", "in_chans", "rel_pos",
             "layer_scale_init")


@dataclass(frozen=True)
class Layout:
    """How a run is split: tensor x pipeline x data ranks, and the ZeRO stage."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    zero_stage: int = 0

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline

    @property
    def world(self) -> int:
        return self.tensor * self.pipeline * self.data

    def mp_rank(self, tp: int, pp: int) -> int:
        """DeepSpeed's model-parallel file index (mp_rank_XX) of tensor rank tp on stage pp."""
        return tp + self.tensor * pp

    def global_rank(self, tp: int, dp: int, pp: int) -> int:
        return tp + self.tensor * (dp + self.data * pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp, dp, pp) of a global rank."""
        tp, rest = rank % self.tensor, rank // self.tensor
        return tp, rest % self.data, rest // self.data

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"TP {self.tensor} x PP {self.pipeline} x DP {self.data}, ZeRO {self.zero_stage}"


def layout_from_dict(value: dict[str, Any], source: str) -> Layout:
    try:
        layout = Layout(**{k: int(value[k]) for k in ("tensor", "pipeline", "data", "zero_stage")})
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: 'layout' must hold integers tensor, pipeline, data and zero_stage "
                              f"({err}); fix the file") from None
    if min(layout.tensor, layout.pipeline, layout.data) < 1 or layout.zero_stage not in (0, 1, 2, 3):
        raise CheckpointError(f"{source}: layout {layout} is not a valid layout")
    return layout


def config_from_dict(value: dict[str, Any], source: str) -> ModelConfig:
    """A ModelConfig from its fields (unknown fields, from a newer vlmo_ds, are ignored)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in value.items() if k in known})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: the model config is not valid ({err})") from None


def shape_summary(cfg: ModelConfig) -> str:
    return f"dim {cfg.dim}, depth {cfg.depth}, heads {cfg.heads}, patch {cfg.patch_size}"


def preset_of(cfg: ModelConfig) -> str | None:
    """The preset whose structure `cfg` has (None for a custom shape)."""
    return next((name for name, p in PRESETS.items() if all(getattr(p, f) == getattr(cfg, f) for f in STRUCTURE)),
                None)


def check_preset(cfg: ModelConfig, name: str, source: str) -> None:
    """CheckpointError when `cfg` (what `source` holds) is not shaped like preset `name`."""
    wanted = preset(name)
    differ = [f"{f} {getattr(cfg, f)} (preset {getattr(wanted, f)})" for f in STRUCTURE
              if getattr(cfg, f) != getattr(wanted, f)]
    if differ:
        found = preset_of(cfg)
        hint = f"it is a {found} model: pass --preset {found} or leave --preset out" if found else \
            "leave --preset out (the checkpoint names its own model)"
        raise CheckpointError(f"{source} is not a {name} model: {', '.join(differ[:4])}; {hint}")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """["vocab_size=30522", "mim_targets=pixels", "layer_scale_init=null"] -> typed values (JSON, else string)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CheckpointError(f"--set {item!r}: write FIELD=VALUE, e.g. --set vocab_size=30522")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def config_from_preset(name: str, overrides: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """Preset `name`, with the recipe-level fields the weights show (vocabulary, MIM head, image size) read from
    their shapes, then `overrides` applied."""
    base = preset(name)
    fields = dataclasses.asdict(base) | overrides  # the patch size etc. the weights were made with
    seen: dict[str, Any] = {}
    words = shapes.get("text_embeddings.word_embeddings.weight")
    if words is not None:
        seen["vocab_size"] = words[0]
    head = shapes.get("mim_head.weight")
    if head is not None:
        pixels = fields["patch_size"] ** 2 * fields["in_chans"]
        seen |= {"mim_targets": "pixels"} if head[0] == pixels else {"mim_targets": "tokens",
                                                                     "mim_vocab_size": head[0]}
    table = shapes.get("relative_position_bias_table")
    if table is not None:
        try:
            seen["image_size"] = window_from_rows(table[0], fields["table_text_len"]) * fields["patch_size"]
        except ValueError:  # no grid fits this text length: keep the preset's size, check_shapes names the misfit
            pass
    try:
        return base.replace(**(seen | overrides))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"--preset {name} with {seen | overrides}: {err}") from None


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's shape of the consolidated model (built on the meta device: no memory)."""
    from vlmo_ds.model.vlmo import VLMo

    with torch.device("meta"):
        model = VLMo(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str, partial: bool = False) -> None:
    """CheckpointError when the weights do not have exactly the entries and shapes `cfg` builds (partial: some
    entries may be absent)."""
    want = model_shapes(cfg)
    wrong = [f"{k} {shapes[k]} vs {want[k]}" for k in want if k in shapes and tuple(shapes[k]) != want[k]]
    missing = [] if partial else [k for k in want if k not in shapes]
    extra = [k for k in shapes if k not in want]
    if wrong or missing or extra:
        parts = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                 (("shape", wrong), ("missing", missing), ("unexpected", extra)) if keys]
        found = preset_of(cfg)
        raise CheckpointError(f"{source} does not fit the model config ({shape_summary(cfg)}"
                              f"{', preset ' + found if found else ''}): {'; '.join(parts)}; pass the preset and "
                              "--set fields it was trained with")


def check_resume_model(checkpoint_dir: str | Path, cfg: ModelConfig) -> None:
    """CheckpointError (a ValueError, one line) when the checkpoint's model ("model" in its trainer.json) has other
    shapes than `cfg`, the model a run is about to resume it into; checkpoints that name no model pass."""
    path = Path(checkpoint_dir) / "trainer.json"
    saved = json.loads(path.read_text()).get("model") if path.is_file() else None
    if not saved:
        return
    saved_cfg = config_from_dict(saved, str(path))
    have, want = model_shapes(saved_cfg), model_shapes(cfg)
    if have == want:
        return
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    differ = [f"{n} {getattr(saved_cfg, n)} (this run {getattr(cfg, n)})" for n in names
              if getattr(saved_cfg, n) != getattr(cfg, n)]
    found = preset_of(saved_cfg)
    raise CheckpointError(f"{checkpoint_dir} holds {'a ' + found if found else 'another'} model: "
                          f"{', '.join(differ[:4])}; resume with the model settings it was trained with, or start "
                          "the stage from its weights (init_from) instead of resuming")
