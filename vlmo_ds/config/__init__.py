"""vlmo_ds's typed run configuration: YAML recipes, `key=value` overrides, validation, DeepSpeed JSON.

    from vlmo_ds.config import load_config, check_files, deepspeed_config, model_config, stage_plan, main_errors

    cfg = load_config("tiny", ["optim.lr=1e-4"], world_size=1)   # ConfigError (one line) on any problem
    check_files(cfg)                                              # after the quick start made its data
    model = build(model_config(cfg, vocab_size=len(tokenizer)))
    ds = deepspeed_config(cfg, dp_size=1, stage=0)

schema (the dataclasses), yaml_tree (recipe and override parsing), build (typing), validate (ranges, layouts),
plan (per-stage numbers, ModelConfig), ds_json (DeepSpeed JSON), load (the entry points).
"""
from vlmo_ds.config.ds_json import deepspeed_config
from vlmo_ds.config.errors import ConfigError, MissingFileError, main_errors
from vlmo_ds.config.load import check_files, find_recipe, load_config, shipped_recipes, to_dict
from vlmo_ds.config.plan import StagePlan, accumulation, find_stage, model_config, stage_plan, start_stage
from vlmo_ds.config.schema import (
    STAGE1_TRAINABLE,
    STAGE2_TRAINABLE,
    STAGE_KINDS,
    TASK_KINDS,
    TRAINABLE_GROUPS,
    DataSource,
    EvalSection,
    LogSection,
    ModelSection,
    OptimSection,
    ParallelSection,
    RunConfig,
    StageConfig,
    TrainSection,
)

__all__ = [
    "ConfigError", "DataSource", "EvalSection", "LogSection", "MissingFileError", "ModelSection", "OptimSection",
    "ParallelSection", "RunConfig", "STAGE1_TRAINABLE", "STAGE2_TRAINABLE", "STAGE_KINDS", "StageConfig", "StagePlan",
    "TASK_KINDS", "TRAINABLE_GROUPS", "TrainSection", "accumulation", "check_files", "deepspeed_config",
    "find_recipe", "find_stage", "load_config", "main_errors", "model_config", "shipped_recipes", "stage_plan",
    "start_stage", "to_dict",
]
