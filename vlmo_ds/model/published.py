"""Import and export of the published VLMo checkpoint layout (microsoft/unilm vlmo, .pth/.ckpt/.pt).

Our module tree uses the published names, so the mapping is key for key. What differs:
- the published files carry derived or unused entries: relative_position_index, text_relative_position_index,
  text_imag_relative_position_index, text_embeddings.position_ids and, with the relative bias, BERT's absolute
  text_embeddings.position_embeddings (never used in the forward pass). Import drops them by name; export writes
  them back (position_ids = arange, the unused position table as zeros) so the published code loads the file as is;
- the masked-image-modelling parameters (transformer.mask_token, mim_head.*) are ours only: export leaves them out;
- the logit scales are 0-dim there and [1] here (DeepSpeed cannot broadcast a 0-dim parameter);
- a relative table built for another image size or text length is resized (BEiT's interpolation for images).
Nothing is unpickled beyond tensors: safetensors, or torch.load(weights_only=True).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmo_ds.ckpt.safe_read import load_torch, read_safetensors
from vlmo_ds.model import relative_position as rp
from vlmo_ds.model.vlmo import VLMo

log = logging.getLogger(__name__)

DERIVED_KEYS = ("relative_position_index", "text_relative_position_index", "text_imag_relative_position_index",
                "text_embeddings.position_ids")
UNUSED_WITH_REL_POS = ("text_embeddings.position_embeddings.weight",)
OURS_ONLY_PREFIXES = ("transformer.mask_token", "mim_head.")
CONTAINERS = ("state_dict", "module", "model")
SCALARS = ("logit_scale", "logit_vl_scale")  # published shape [], ours [1]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: weights at top level or under state_dict / module / model, "module." stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # truncated, corrupt or holding more than tensors: a one-line CheckpointError (a ValueError) naming the file
    state = read_safetensors(path)[0] if path.suffix == ".safetensors" else load_torch(path)
    return state_tensors(state, path)


def state_tensors(state: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object: at top level or under state_dict / module / model (the first that
    is a dict), "module." stripped; ValueError naming `path` when there are none."""
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    for container in CONTAINERS:
        if isinstance(state.get(container), dict):
            state = state[container]
            break
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors at top level or under {' / '.join(CONTAINERS)}")
    return tensors


@dataclass
class ImportReport:
    dropped: list[str] = field(default_factory=list)
    """Derived or unused published entries left out by design."""
    resized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Our parameters the file did not have (they keep their initial values)."""
    unexpected: list[str] = field(default_factory=list)
    """Entries of the file our model has no place for."""
    mismatched: list[str] = field(default_factory=list)

    def problems(self) -> str:
        parts = [f"{name}: {', '.join(keys)}" for name, keys in
                 (("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", self.mismatched))
                 if keys]
        return "; ".join(parts)


def import_published(model: VLMo, state: dict[str, torch.Tensor], strict: bool = True) -> ImportReport:
    """Load published-layout tensors into `model`. strict: any missing, unexpected or mismatched key is an error."""
    cfg, report = model.cfg, ImportReport()
    state = dict(state)
    for key in DERIVED_KEYS + (UNUSED_WITH_REL_POS if cfg.rel_pos else ()):
        if state.pop(key, None) is not None:
            report.dropped.append(key)
    for key in SCALARS:
        if key in state and state[key].dim() == 0:
            state[key] = state[key].reshape(1)
    table_key = "relative_position_bias_table"
    if cfg.rel_pos and table_key in state:
        state[table_key] = _fit_table(state[table_key], cfg, report)
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} vs ours {tuple(own[key].shape)}")
    report.missing = [k for k in own if k not in state]
    if strict and report.problems():
        raise ValueError(f"checkpoint does not fit the model ({report.problems()}); check the preset, image_size "
                         "and max_text_len, or load with strict=False to keep our values for the missing keys")
    if report.problems():
        log.warning("published checkpoint: %s", report.problems())
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loadable, strict=False)
    return report


def _fit_table(table: torch.Tensor, cfg, report: ImportReport) -> torch.Tensor:
    """Resize a relative table saved for another image size (rows) to ours; 196 text rows is the published norm."""
    ours = rp.num_rows(cfg.window, cfg.table_text_len)
    if table.shape[0] == ours:
        return table
    src_window = rp.window_from_rows(table.shape[0], cfg.table_text_len)
    report.resized.append(f"relative_position_bias_table: image grid {src_window} -> {cfg.window}")
    return rp.resize_image_rows(table, src_window, cfg.window)


def export_published(model: VLMo) -> dict[str, torch.Tensor]:
    """Our weights in the published layout, with the entries the published code expects to find."""
    cfg = model.cfg
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if not k.startswith(OURS_ONLY_PREFIXES)}
    for key in SCALARS:
        state[key] = state[key].reshape(())
    if cfg.rel_pos:
        state["text_embeddings.position_embeddings.weight"] = torch.zeros(cfg.max_text_len, cfg.dim)
    state["text_embeddings.position_ids"] = torch.arange(cfg.max_text_len).unsqueeze(0)
    return state


def save_published(model: VLMo, path: str | Path) -> None:
    """Write a .pth the published code loads (torch.load -> ckpt["state_dict"]); written to a temporary name first."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": export_published(model)}, tmp)
    tmp.replace(path)
