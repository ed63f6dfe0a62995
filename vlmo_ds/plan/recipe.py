"""What the planner reads of a recipe: the image-text stage's model, global batch, precision and clipping."""
from __future__ import annotations

from dataclasses import dataclass

from vlmo_ds.config.errors import ConfigError
from vlmo_ds.config.plan import model_config, model_value, stage_batches
from vlmo_ds.config.schema import RunConfig
from vlmo_ds.model.config import ModelConfig


BERT_VOCAB = 30522
"""The vocabulary planned for when a recipe takes the tokenizer's (vocab_size auto)."""


@dataclass(frozen=True)
class RecipeStep:
    model: ModelConfig
    global_batch: int
    precision: str
    """"bf16" or "fp32"."""
    grad_clip: float
    micro_batch: int
    """The recipe's own micro batch (the planner tries others)."""


def recipe_step(recipe: str | RunConfig, overrides=()) -> RecipeStep:
    """The image-text stage of `recipe` (a shipped name, a YAML path or a RunConfig); a ConfigError when it has none."""
    from vlmo_ds.config.load import load_config

    cfg = recipe if isinstance(recipe, RunConfig) else load_config(recipe, list(overrides))
    for index, stage in enumerate(cfg.stages):
        if stage.kind == "image_text":
            micro, total = stage_batches(cfg, stage)
            model = model_config(cfg, BERT_VOCAB if model_value(cfg, "vocab_size") == "auto" else None, stage=index)
            return RecipeStep(model, total, cfg.precision, cfg.optim.grad_clip, micro)
    raise ConfigError("stages: the planner models the image_text stage, and this recipe has none; "
                      "add one or plan a recipe that has it")
