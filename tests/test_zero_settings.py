"""ZeRO communication settings derived from the model (vlmo_ds.config.zero_settings) and their way into the
DeepSpeed config: several reduce buckets per backward for every preset, gradients reduced to their owners, ZeRO-3
keeping gathered parameters for the step where they fit, fp32 gradient reduction and accumulation under bf16, and a
JSON's own keys winning. The traffic they produce is measured in tests/test_bench_traffic.py."""
from __future__ import annotations

import json
import os

import pytest

from vlmo_ds.config import deepspeed_config, load_config
from vlmo_ds.config.ds_json import DS_CONFIGS
from vlmo_ds.config.zero_settings import (BUCKET_CAP, BUCKET_FLOOR, parameter_count, with_zero_settings,
                                          zero_settings)
from vlmo_ds.model.config import PRESETS, preset
from vlmo_ds.parallel.pipeline_passes import image_text_passes

CLUSTER_PRESETS = [name for name in PRESETS if name != "tiny"]


def test_parameter_counts_of_the_presets():
    assert parameter_count(preset("tiny")) == 1_841_100  # as tools/bench.py counts the built model
    assert parameter_count(preset("huge2b")) == 4_383_558_462


@pytest.mark.parametrize("name", CLUSTER_PRESETS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_several_reduce_buckets_per_backward(name, stage):
    for model_parallel in (1, 2, 8):
        zero = zero_settings(preset(name), stage, model_parallel)["zero_optimization"]
        bucket = zero["reduce_bucket_size"]
        assert BUCKET_FLOOR <= bucket <= BUCKET_CAP and bucket % 2 == 0
        assert parameter_count(preset(name)) / model_parallel / bucket >= 4, "one bucket per backward overlaps nothing"
        assert zero["overlap_comm"] is True
        if stage < 3:
            assert zero["use_multi_rank_bucket_allreduce"] is False and zero["allgather_bucket_size"] == bucket


def test_zero3_keeps_huge2b_gathered_for_the_step_in_bf16():
    cfg = preset("huge2b")
    params = parameter_count(cfg)
    trace = 2 * image_text_passes(cfg.depth, cfg.vlffn_start) * params  # forward and backward of every pass
    zero = zero_settings(cfg, 3, 1, "bf16")["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] >= trace and zero["stage3_max_live_parameters"] >= params
    assert zero["stage3_param_persistence_threshold"] == cfg.mlp_dim
    assert 2 * params / cfg.depth <= zero["stage3_prefetch_bucket_size"] or zero["stage3_prefetch_bucket_size"] == 1e8
    # fp32 (17.5 GB gathered) is over the default 16 GiB: released after each block, at most the budget live
    released = zero_settings(cfg, 3, 1, "fp32")["zero_optimization"]
    assert released["stage3_max_reuse_distance"] < params / cfg.depth * 1.5
    assert released["stage3_max_live_parameters"] == pytest.approx(16 * 2**30 / 4, rel=1e-3)
    # the planner passes its GPU's budget: a 40 GB GPU might allow 4 GiB
    small = zero_settings(cfg, 3, 1, "bf16", gathered_budget_bytes=4 * 2**30)["zero_optimization"]
    assert small["stage3_max_reuse_distance"] < trace / 10
    # under TP 8 a rank holds 1/8: kept again
    assert zero_settings(cfg, 3, 8, "fp32")["zero_optimization"]["stage3_max_reuse_distance"] >= trace / 8


@pytest.mark.parametrize("stage, accum", [(0, None), (1, None), (2, "fp32"), (3, "fp32")])
def test_bf16_reduces_in_fp32_and_accumulates_in_fp32_where_deepspeed_can(stage, accum):
    out = zero_settings(preset("base"), stage, 1, "bf16")
    assert out["communication_data_type"] == "fp32"
    assert out.get("data_types", {}).get("grad_accum_dtype") == accum
    assert "communication_data_type" not in zero_settings(preset("base"), stage, 1, "fp32")
    assert ("zero_optimization" in out) == (stage > 0)


def test_the_json_wins_key_by_key():
    tree = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 123}, "data_types": {"grad_accum_dtype": "bf16"},
            "communication_data_type": "bf16"}
    out = with_zero_settings(tree, zero_settings(preset("large"), 2, 1, "bf16"))
    assert out["zero_optimization"]["reduce_bucket_size"] == 123
    assert out["zero_optimization"]["use_multi_rank_bucket_allreduce"] is False  # the keys it leaves unset
    assert out["data_types"] == {"grad_accum_dtype": "bf16"} and out["communication_data_type"] == "bf16"
    assert tree["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 123}  # not modified in place


DERIVED_KEYS = {"reduce_bucket_size", "allgather_bucket_size", "use_multi_rank_bucket_allreduce",
                "stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance",
                "stage3_param_persistence_threshold"}


@pytest.mark.parametrize("path", sorted(DS_CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_jsons_leave_the_derived_keys_to_the_preset(path):
    tree = json.loads(path.read_text())
    assert not DERIVED_KEYS & set(tree["zero_optimization"]), "a key set here would never follow the model size"
    assert "data_types" not in tree and "communication_data_type" not in tree


def test_deepspeed_config_derives_from_the_stage_model_and_layout():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig
    import torch

    cfg = load_config("large", ["parallel.zero_stage=3"])
    out = deepspeed_config(cfg, dp_size=64, stage=0)
    assert cfg.model.preset == "large"
    assert out["zero_optimization"] | {"stage": 3} == out["zero_optimization"]
    assert out["zero_optimization"]["reduce_bucket_size"] == BUCKET_CAP  # 6e8 / 8 capped at 5e7: 12 buckets
    assert out["communication_data_type"] == "fp32" and out["data_types"] == {"grad_accum_dtype": "fp32"}
    parsed = DeepSpeedConfig({**out, "train_batch_size": out["train_micro_batch_size_per_gpu"]
                              * out["gradient_accumulation_steps"]})
    assert parsed.communication_data_type == torch.float32 and parsed.grad_accum_dtype == "fp32"
    assert parsed.zero_config.use_multi_rank_bucket_allreduce is True  # not a ZeRO-3 key: left at its default
    assert parsed.zero_config.max_reuse_distance == out["zero_optimization"]["stage3_max_reuse_distance"]
    tp = deepspeed_config(load_config("large", ["parallel.zero_stage=1", "parallel.tensor=4", "model.vocab_size=30524"]),
                          dp_size=16)
    assert tp["zero_optimization"]["reduce_bucket_size"] == 19_000_000  # a quarter of the model per rank, / 8
    assert tp["zero_optimization"]["use_multi_rank_bucket_allreduce"] is False
