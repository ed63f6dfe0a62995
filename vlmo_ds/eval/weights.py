"""A VLMo for evaluation from consolidated weights: a stage record's weights.safetensors (its ModelConfig is in the
file's metadata, vlmo_ds.train.stage_record) or a published / converted checkpoint with a named preset.

The task decides what the weights must hold: VQA and NLVR2 need their fine-tuned head (an evaluation of an
untrained head would be noise, so its absence is an error), retrieval and the embedding export need only the
encoders (ITM re-ranking uses the pre-training ITM head, always present). The image size may differ from the one the
weights were trained at: the position tables are fitted as when fine-tuning starts (vlmo_ds.tasks.start).
A stage's folder stands for the weights.safetensors in it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.model.config import ModelConfig, preset
from vlmo_ds.model.published import read_state_dict
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.tasks.heads import HEADS, head_answers
from vlmo_ds.tasks.start import TYPE_KEY, build_task_model, load_task_weights, task_model_config
from vlmo_ds.train.checkpoint import TRAINER_FILE
from vlmo_ds.train.stage_record import STAGES_DIR, WEIGHTS_FILE, weights_config

log = logging.getLogger(__name__)


def weights_file(weights: str | os.PathLike) -> Path:
    """The file `weights` names: itself, or the weights.safetensors of a stage's folder (RUN_DIR/stages/NAME)."""
    path = Path(weights)
    if not path.is_dir():
        return path
    if (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    if (path / TRAINER_FILE).is_file():
        hint = f"it is a training checkpoint: consolidate it first (python tools/ckpt.py consolidate {path} OUT)"
    elif (path / STAGES_DIR).is_dir():
        hint = f"it is a run folder: give one of {', '.join(str(p) for p in sorted((path / STAGES_DIR).iterdir()))}"
    else:
        hint = "give a stage's folder (RUN_DIR/stages/NAME) or a weights file"
    raise CheckpointError(f"{path} is a folder without {WEIGHTS_FILE}; {hint}")


def eval_model(weights: str | os.PathLike, task: str, image_size: int | None = None,
               preset_name: str | None = None) -> VLMo:
    """The model of `weights` for `task` ("retrieval", "vqa", "nlvr2"), in eval mode, on the CPU."""
    path = Path(weights)
    state = read_state_dict(path)
    stored = own = weights_config(path)
    if stored is None:
        if preset_name is None:
            raise ValueError(f"{path} carries no vlmo_ds model config (it is not a stage record's weights); name "
                             "the model with --preset (base, large, ...) and --image-size")
        stored = preset(preset_name)
    if TYPE_KEY in state:
        stored = stored.replace(num_modality_types=int(state[TYPE_KEY].shape[0]))
    head = HEADS.get(task)
    if head is not None and not any(k.startswith(head + ".") for k in state):
        raise ValueError(f"{path} holds no {head}: evaluate {task} with the weights of a {task} fine-tuning stage")
    overrides = {} if image_size is None else {"image_size": image_size}
    cfg: ModelConfig = task_model_config(stored, task, **overrides)
    model = build_task_model(cfg, task, head_answers(state))
    # A published file's table may be for another image size than the preset's: let its row count tell.
    report = load_task_weights(model, state, task, src=None if own is None else stored)
    if report.kept_init:
        log.warning("%s lacks %d entries of the model (kept initialised): %s", path, len(report.kept_init),
                    ", ".join(report.kept_init[:8]))
    if report.resized:
        log.info("re-sized for evaluation: %s", "; ".join(report.resized))
    return model.eval()
