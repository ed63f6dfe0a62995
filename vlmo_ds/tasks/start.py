"""The model a fine-tuning task starts from: its config (image size, modality types), its head, and its weights.

A task model is the pre-trained VLMo with
- the task's image size (224 -> 384 for retrieval and NLVR2, 480 for VQA in the published recipes): the relative
  position table's image rows are interpolated (or the absolute image positions, for models without the relative
  bias) by the stage-transition rules of vlmo_ds.train.transition, which the stages use too;
- for NLVR2, a third modality type row for the second image, a copy of the image row (row 1), as the published
  code grows it when NLVR2 fine-tuning starts; a checkpoint that already has three rows keeps them;
- the task's head (vlmo_ds.tasks.heads), initialised unless the weights hold it.
"""
from __future__ import annotations

import torch

from vlmo_ds.model.config import NLVR2_MODALITY_TYPES, ModelConfig
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.tasks.heads import attach_head
from vlmo_ds.train.transition import StartReport, load_start_weights

TYPE_KEY = "token_type_embeddings.weight"
TASKS = ("retrieval", "vqa", "nlvr2")


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown fine-tuning task {task!r}; choose one of {', '.join(TASKS)}")


def task_model_config(cfg: ModelConfig, task: str, **overrides) -> ModelConfig:
    """`cfg` for `task`: three modality types for NLVR2, then `overrides` (image_size=384, drop_path_rate=0.15...)."""
    check_task(task)
    if task == "nlvr2":
        cfg = cfg.replace(num_modality_types=max(NLVR2_MODALITY_TYPES, cfg.num_modality_types))
    return cfg.replace(**overrides)


def grow_type_rows(state: dict[str, torch.Tensor], rows: int = NLVR2_MODALITY_TYPES) -> dict[str, torch.Tensor]:
    """The state with the modality type table grown to `rows` rows, each new row a copy of the image row (row 1).

    [2, D] -> [3, D] for NLVR2 (row 2 = row 1). A table that already has `rows` rows or more is left unchanged.
    """
    table = state.get(TYPE_KEY)
    if table is None or table.shape[0] >= rows:
        return state
    if table.shape[0] < 2:
        raise ValueError(f"{TYPE_KEY} has {table.shape[0]} row(s); a VLMo checkpoint has a text and an image row")
    extra = table[1:2].expand(rows - table.shape[0], -1)
    return {**state, TYPE_KEY: torch.cat([table, extra], dim=0)}


def build_task_model(cfg: ModelConfig, task: str, num_answers: int | None = None) -> VLMo:
    """A VLMo built from `cfg` (already the task's, see task_model_config) with the task's head attached."""
    check_task(task)
    if task == "nlvr2" and cfg.num_modality_types < NLVR2_MODALITY_TYPES:
        raise ValueError("an NLVR2 model needs num_modality_types=3; build its config with task_model_config")
    model = VLMo(cfg)
    attach_head(model, task, num_answers)
    return model


def load_task_weights(model: VLMo, state: dict[str, torch.Tensor], task: str,
                      src: ModelConfig | None = None) -> StartReport:
    """Fill a task model from pre-trained (or fine-tuned) weights: the type table grown for NLVR2, the position
    tables fitted to the model's image size and text length; entries the weights lack (a new head) keep their
    initialisation (listed in the report's kept_init)."""
    check_task(task)
    if task == "nlvr2":
        state = grow_type_rows(state, model.cfg.num_modality_types)
    return load_start_weights(model, state, src)
