"""ds_configs/*.json: what each file holds, what deepspeed_config() fills in, and DeepSpeed's own parser accepting it.

DeepSpeedConfig(dict) needs no process group: without one it assumes a world of 1, so the data-parallel case
stubs deepspeed.comm.get_rank and hands DeepSpeed an mpu that reports the data-parallel size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vlmo_ds.config import deepspeed_config, load_config
from vlmo_ds.config.ds_json import DS_CONFIGS, RECIPE_OWNED

FILES = sorted(DS_CONFIGS.glob("*.json"))
EXPECTED = {"cpu.json", "zero3_offload_bf16.json"} | {f"zero{s}_{p}.json" for s in range(4) for p in ("fp32", "bf16")}


@pytest.fixture(scope="module")
def ds_config_module():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks an accelerator
    return pytest.importorskip("deepspeed.runtime.config")


def _expected_stage_and_bf16(path: Path) -> tuple[int, bool]:
    if path.name == "cpu.json":
        return 0, False
    return int(path.name[4]), "bf16" in path.name


def test_the_shipped_set():
    assert {p.name for p in FILES} == EXPECTED


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_contents(path):
    tree = json.loads(path.read_text())
    assert isinstance(tree["_comment"], str) and len(tree["_comment"]) > 40
    assert not set(tree) & set(RECIPE_OWNED), "batch sizes, clipping, optimizer and scheduler come from the recipe"
    stage, bf16 = _expected_stage_and_bf16(path)
    assert tree["zero_optimization"]["stage"] == stage
    assert tree["bf16"] == {"enabled": bf16}
    assert "fp16" not in tree
    offload = "offload" in path.name
    assert ("offload_param" in tree["zero_optimization"]) == offload
    assert ("offload_optimizer" in tree["zero_optimization"]) == offload
    if offload:
        assert tree["zero_optimization"]["offload_param"]["device"] == "cpu"
        assert tree["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def _cfg(path: Path, *overrides: str):
    # The recipe leaves stage and precision to the JSON; micro 4 x dp 2 x accumulation 4 = 32.
    return load_config("tiny_image_text", [f"deepspeed={path}", "parallel.zero_stage=null", "precision=null",
                                "train.micro_batch=4", "train.global_batch=32", *overrides])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_filled_fields_and_deepspeed_accepts_them(path, ds_config_module):
    stage, bf16 = _expected_stage_and_bf16(path)
    cfg = _cfg(path)
    out = deepspeed_config(cfg, dp_size=1)
    assert out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_accumulation_steps"] == 8
    assert out["train_batch_size"] == 32
    assert out["gradient_clipping"] == 1.0
    assert out["zero_optimization"]["stage"] == stage and out["bf16"]["enabled"] is bf16
    assert not any(key.startswith("_") for key in out)
    parsed = ds_config_module.DeepSpeedConfig(out)
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (
        32, 4, 8)
    assert parsed.gradient_clipping == 1.0
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled is bf16


def test_recipe_overrides_json_stage_precision_and_clipping(ds_config_module):
    cfg = _cfg(DS_CONFIGS / "zero1_bf16.json", "parallel.zero_stage=2", "precision=fp32", "optim.grad_clip=0")
    out = deepspeed_config(cfg, dp_size=1)
    assert out["zero_optimization"]["stage"] == 2 and out["bf16"]["enabled"] is False
    assert out["gradient_clipping"] == 0.0  # written even when off: DeepSpeed's own default would clip at 1.0
    parsed = ds_config_module.DeepSpeedConfig(out)
    assert parsed.zero_optimization_stage == 2 and parsed.gradient_clipping == 0.0
    assert parsed.bfloat16_config.enabled is False


class _DataParallelMpu:
    """The one mpu method DeepSpeedConfig asks for."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


def test_data_parallel_batch_arithmetic(ds_config_module, monkeypatch):
    cfg = _cfg(DS_CONFIGS / "zero2_fp32.json")
    out = deepspeed_config(cfg, dp_size=2)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) == (
        4, 4, 32)  # 4 micro x 4 accumulation x 2 ranks
    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda *args, **kwargs: 0)
    parsed = ds_config_module.DeepSpeedConfig(out, mpu=_DataParallelMpu(2))
    assert parsed.world_size == 2 and parsed.train_batch_size == 32 and parsed.gradient_accumulation_steps == 4
    with pytest.raises(AssertionError):  # DeepSpeed itself checks micro x accumulation x dp = global
        ds_config_module.DeepSpeedConfig(out, mpu=_DataParallelMpu(4))


def test_per_stage_batches():
    cfg = load_config("base")
    text_stage = deepspeed_config(cfg, dp_size=8, stage="text_mlm")
    assert (text_stage["train_micro_batch_size_per_gpu"], text_stage["gradient_accumulation_steps"]) == (32, 4)
    assert text_stage["zero_optimization"]["stage"] == 1 and text_stage["bf16"]["enabled"] is True
    cfg = load_config("base", ["stages.text_mlm.micro_batch=64"])
    assert deepspeed_config(cfg, dp_size=16, stage=1)["gradient_accumulation_steps"] == 1  # 64 x 1 x 16 = 1024
