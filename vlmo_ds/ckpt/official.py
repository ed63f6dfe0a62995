"""Our consolidated layout <-> the published VLMo checkpoint layout (microsoft/unilm vlmo), via
vlmo_ds.model.published (which knows the key-for-key mapping: derived entries, scalar shapes, MIM parameters).

export: the published code loads the .pth as is (torch.load(...)["state_dict"]). import: a published .pth / .ckpt /
.safetensors -> OUT/ in our consolidated layout; its preset is found from the shapes when --preset is not given;
task heads the pre-training model has no place for (vqa_classifier, nlvr2_classifier) are reported and left out.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vlmo_ds.ckpt.consolidated import Consolidated
from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.ckpt.layout import check_shapes, config_from_preset
from vlmo_ds.ckpt.safe_read import load_torch, read_safetensors
from vlmo_ds.ckpt.safe_write import OutDir
from vlmo_ds.model.config import PRESETS, ModelConfig
from vlmo_ds.model.published import (DERIVED_KEYS, OURS_ONLY_PREFIXES, SCALARS, UNUSED_WITH_REL_POS,
                                     export_published, import_published, state_tensors)
from vlmo_ds.model.vlmo import VLMo

log = logging.getLogger(__name__)



def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (safetensors, or torch weights-only): at top level or under state_dict /
    module / model, a "module." prefix stripped."""
    path = Path(path)
    state: Any = read_safetensors(path)[0] if path.suffix == ".safetensors" else load_torch(path)
    try:
        return state_tensors(state, path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _ours_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The published tensors' shapes as our model names them (derived entries out, scalars [1])."""
    skip = set(DERIVED_KEYS) | set(UNUSED_WITH_REL_POS)
    return {k: (1,) if k in SCALARS else tuple(v.shape) for k, v in state.items() if k not in skip}


def published_config(state: dict[str, torch.Tensor], preset: str | None, overrides: dict[str, Any],
                     source: str) -> ModelConfig:
    """The config of published weights: `preset` (checked against the shapes), else the preset they fit."""
    shapes = _ours_shapes(state)
    if "relative_position_bias_table" not in shapes:  # absolute positions: the unused table is the used one
        shapes["text_embeddings.position_embeddings.weight"] = tuple(
            state["text_embeddings.position_embeddings.weight"].shape)
    shapes = {k: v for k, v in shapes.items() if not k.startswith(("vqa_", "nlvr2_"))}
    if preset is not None:
        cfg = config_from_preset(preset, overrides, shapes)
        check_shapes(cfg, shapes, source)
        return cfg
    for name in PRESETS:
        cfg = config_from_preset(name, overrides, shapes)
        try:
            check_shapes(cfg, shapes, source)
        except CheckpointError:
            continue
        log.info("%s fits preset %s", source, name)
        return cfg
    raise CheckpointError(f"{source} fits none of the presets ({', '.join(PRESETS)}); pass --preset NAME and --set "
                          "FIELD=VALUE for the fields that differ")


def import_official(path: str | Path, preset: str | None = None,
                    overrides: dict[str, Any] | None = None) -> Consolidated:
    """Published weights -> our consolidated weights (float32, no optimizer state)."""
    state = read_tensors(path)
    cfg = published_config(state, preset, overrides or {}, str(path))
    model = VLMo(cfg)
    report = import_published(model, state, strict=False)
    if report.mismatched or report.missing:
        raise CheckpointError(f"{path} does not fit {cfg.dim}-wide, {cfg.depth}-deep VLMo: {report.problems()}")
    if report.unexpected:
        log.warning("left out (no place in the pre-training model): %s", ", ".join(report.unexpected))
    log.info("imported %d tensors from %s; dropped derived entries: %s", len(state) - len(report.unexpected),
             path, ", ".join(report.dropped) or "none")
    weights = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return Consolidated(cfg, weights, source=str(path))


def export_official(state: Consolidated, out_file: str | Path) -> list[str]:
    """Write the published layout to out_file (atomically); returns our entries it leaves out (MIM)."""
    model = VLMo(state.cfg)
    model.load_state_dict(state.weights, strict=True)
    published = export_published(model)
    out_file = Path(out_file)
    OutDir(out_file.parent).save_torch(out_file.name, obj={"state_dict": published})
    return [k for k in state.weights if k.startswith(OURS_ONLY_PREFIXES)]
