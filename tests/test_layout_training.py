"""Tensor-, pipeline- and ZeRO-3 layouts through the real trainer (vlmo_ds.train.trainer.train on gloo ranks, fp32)
compute what the one-layout runs compute, save and resume in their layout, and hand on consolidated weights.

Each layout trains the tiny image-text recipe on the synthetic test data for 3 steps (2 micro-batches per step when
the data-parallel size is 1, so the pipeline schedules run 1F1B over two micro-batches) and is compared with:
    TP=2, TP=2 x PP=2 (activation checkpointing on)       the single-process run
    PP=2 + ZeRO-1, TP=2 + ZeRO-3 (both DP=2, 4 processes)  the data-parallel run on 2 processes (ZeRO-0). The
        loaders split the shards by data-parallel rank, so only a run with the same data-parallel size reads the
        same samples; that run equals one process on the same global batch (tests/test_zero_equivalence.py).
Per step every logged loss, accuracy and the gradient norm agree to 1e-5 relative; the consolidated final weights
(the stage record, merged from the TP shards and PP stages by the trainer) agree element-wise to 1e-5 relative plus
1e-6 absolute (as tests/test_zero_equivalence.py): the absolute part covers biases whose gradient is a sum that
cancels to ~1e-5 of its terms, where rounding is relatively large; a wrong update shows at the scale of one step's
change, ~1e-3 per element here.

The optimizer is AdamW with lr 1 and eps 1 (recipe values otherwise: betas, weight decay, clipping at 1). With the
recipe's eps 1e-8 an Adam update is nearly sign(gradient): a gradient whose rounding differs (TP and ZeRO sum
partial products in another order) moves its element by up to a whole step when it sits near eps, and the 3-step
weights then differ by ~1e-4 of a tensor's norm between layouts that are both right (two data-parallel runs at ZeRO-0
and ZeRO-3 do). With eps 1 (gradients here are ~1e-3 per element) the update is lr x the bias-corrected momentum:
linear in the gradient, so the final weights check the gradients themselves (a doubled or missing share shows,
which a sign-like update would hide) and rounding stays rounding.

Resume: the TP=2 x PP=2 and TP=2 + ZeRO-3 workers continue their own step-2 checkpoint in a fresh run folder and
reach the uninterrupted step-3 loss and weights exactly. The CPU shims megatron-core's pipeline schedules need
(tests/megatron_cpu.py) are installed only in the pipeline workers; tensor parallelism runs the product path as is.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed import run_ranks
from train_cli import losses
from vlmo_ds.config import ConfigError, load_config, model_config
from vlmo_ds.parallel.launch import DistEnv
from vlmo_ds.train import checkpoint
from vlmo_ds.train.layout import place
from vlmo_ds.train.metrics import read_metrics

STEPS = 3
RESUME_AT = 2


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"tokenizer={data / 'tok.model'}", f"stages.0.data={data / 'pretrain_pairs'}",
            "eval.retrieval=null", f"stages.0.steps={STEPS}", "train.micro_batch=4", "train.global_batch=8",
            f"train.ckpt_every={RESUME_AT}", "train.keep_last=2", "train.num_workers=0", "train.resume=none",
            "model.patch_size=16", "model.max_text_len=16", "model.rel_pos=true", "optim.lr=1.0", "optim.eps=1.0",
            *extra]


def train_rank(rank, world, args, pipeline, resume_args, mismatch_args):
    """One rank of a run; then, in the same processes (one layout per process), a resume of its step-2 checkpoint
    (resume_args) and a resume in another layout (mismatch_args), whose one-line refusal is returned."""
    if pipeline:
        from megatron_cpu import allow_cpu_pipeline

        allow_cpu_pipeline()
    from vlmo_ds.parallel.launch import discover
    from vlmo_ds.train.trainer import train

    env = discover()
    out = {"final": train(load_config("tiny_image_text", args, world_size=world), env).final}
    if resume_args:
        out["resumed"] = train(load_config("tiny_image_text", resume_args, world_size=world), env).final
    if mismatch_args:
        try:
            train(load_config("tiny_image_text", mismatch_args, world_size=world), env)
        except ValueError as err:
            out["refused"] = str(err)
    return out


def run(data: Path, root: Path, world: int, *extra: str, resume: bool = False, mismatch: tuple = ()) -> dict:
    """Train one layout; returns its run folders and each rank's result."""
    pipeline = any(item.startswith("parallel.pipeline=") and item != "parallel.pipeline=1" for item in extra)
    run_dir, resumed_dir = root / "run", root / "resumed"
    step = checkpoint.root_of(run_dir) / f"step_{RESUME_AT:08d}"
    resume_args = overrides(data, resumed_dir, *extra, f"train.resume={step}") if resume else None
    mismatch_args = overrides(data, root / "refused", *mismatch, f"train.resume={step}") if mismatch else None
    ranks = run_ranks(train_rank, world, overrides(data, run_dir, *extra), pipeline, resume_args, mismatch_args,
                      use_deepspeed=True)
    return {"run": run_dir, "resumed": resumed_dir, "ranks": ranks}


def step_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per step: the train/* losses and accuracies and the gradient norm."""
    out = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        found = {k: v for k, v in record.items() if k.startswith("train/") or k == "opt/grad_norm"}
        if found:
            out.setdefault(record["step"], {}).update(found)
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "stages" / "image_text" / "weights.safetensors"))


def assert_same_training(got: dict, want: dict) -> None:
    mine, reference = step_metrics(got["run"]), step_metrics(want["run"])
    assert sorted(mine) == sorted(reference) == list(range(1, STEPS + 1))
    for step, values in reference.items():
        assert set(mine[step]) == set(values), step
        for key, value in values.items():
            assert mine[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    assert reference[1]["opt/grad_norm"] > 1.0  # clipping at 1 is exercised
    weights, expected = final_weights(got["run"]), final_weights(want["run"])
    assert set(weights) == set(expected)
    for key, value in expected.items():
        assert weights[key].shape == value.shape, key
        assert torch.allclose(weights[key], value, rtol=1e-5, atol=1e-6), (key, (weights[key] - value).abs().max())
    finals = [r["final"] for r in got["ranks"]]
    assert all(f == finals[0] for f in finals)  # every rank reports the replica's (data-parallel mean) losses


def assert_exact_resume(layout: dict) -> None:
    whole, resumed = losses(layout["run"]), losses(layout["resumed"])
    assert sorted(resumed) == [STEPS] and resumed[STEPS] == whole[STEPS]
    weights, expected = final_weights(layout["resumed"]), final_weights(layout["run"])
    assert all(torch.equal(weights[k], v) for k, v in expected.items())


def saved_files(layout: dict) -> tuple[list[str], dict]:
    folder = checkpoint.root_of(layout["run"]) / f"step_{RESUME_AT:08d}"
    return sorted(p.name for p in folder.iterdir()), json.loads((folder / checkpoint.TRAINER_FILE).read_text())


# ---- runs, one per layout, shared by the tests of this module ---------------------------------------------------
@pytest.fixture(scope="module")
def single(run_data, tmp_path_factory):
    return run(run_data, tmp_path_factory.mktemp("single"), 1)


@pytest.fixture(scope="module")
def data_parallel(run_data, tmp_path_factory):
    return run(run_data, tmp_path_factory.mktemp("dp2"), 2)


@pytest.fixture(scope="module")
def tensor2(run_data, tmp_path_factory):
    return run(run_data, tmp_path_factory.mktemp("tp2"), 2, "parallel.tensor=2",
               mismatch=("parallel.tensor=2", "parallel.zero_stage=1"))


@pytest.fixture(scope="module")
def tensor2_pipeline2(run_data, tmp_path_factory):
    return run(run_data, tmp_path_factory.mktemp("tp2pp2"), 4, "parallel.tensor=2", "parallel.pipeline=2",
               "parallel.zero_stage=1", "parallel.activation_checkpointing=true", resume=True)


@pytest.fixture(scope="module")
def pipeline2_zero1(run_data, tmp_path_factory):
    # the shipped ZeRO-1 config (overlap_comm on): pipeline stages must reduce once, after the schedule
    shipped = Path(__file__).resolve().parents[1] / "ds_configs" / "zero1_bf16.json"
    return run(run_data, tmp_path_factory.mktemp("pp2z1"), 4, "parallel.pipeline=2", "parallel.zero_stage=1",
               f"deepspeed={shipped}", "precision=fp32")


@pytest.fixture(scope="module")
def tensor2_zero3(run_data, tmp_path_factory):
    return run(run_data, tmp_path_factory.mktemp("tp2z3"), 4, "parallel.tensor=2", "parallel.zero_stage=3",
               resume=True)


# ---- equivalence --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tensor_parallel_trains_like_one_process(single, tensor2):
    assert_same_training(tensor2, single)
    files, trainer = saved_files(tensor2)
    assert files == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "rank_0.pt", "rank_1.pt",
                     "trainer.json"]
    assert trainer["layout"] == {"tensor": 2, "pipeline": 1, "data": 1, "zero_stage": 0}
    refused = tensor2["ranks"][0]["refused"]
    assert "was saved in layout tensor 2 x pipeline 1 x data 1 x zero_stage 0, this run is tensor 2 x pipeline 1 x " \
           "data 1 x zero_stage 1" in refused and "`python tools/ckpt.py reshard`" in refused
    assert "\n" not in refused


@pytest.mark.slow
def test_tensor_by_pipeline_trains_like_one_process_and_resumes_exactly(single, tensor2_pipeline2):
    assert_same_training(tensor2_pipeline2, single)
    assert_exact_resume(tensor2_pipeline2)
    files, trainer = saved_files(tensor2_pipeline2)
    assert [f for f in files if f.startswith(("mp_rank", "zero"))] == \
        [f"mp_rank_0{r}_model_states.pt" for r in range(4)] + \
        [f"zero_pp_rank_0_mp_rank_0{r}_optim_states.pt" for r in range(4)]
    assert trainer["layout"] == {"tensor": 2, "pipeline": 2, "data": 1, "zero_stage": 1}
    assert trainer["model"]["heads"] == 4 and trainer["model"]["rel_pos"] is True


@pytest.mark.slow
def test_pipeline_with_zero1_trains_like_data_parallel(data_parallel, pipeline2_zero1):
    assert_same_training(pipeline2_zero1, data_parallel)
    files, trainer = saved_files(pipeline2_zero1)
    assert [f for f in files if f.startswith(("mp_rank", "zero"))] == \
        ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"] + \
        [f"zero_pp_rank_{d}_mp_rank_0{m}_optim_states.pt" for d in range(2) for m in range(2)]
    assert trainer["layout"] == {"tensor": 1, "pipeline": 2, "data": 2, "zero_stage": 1}


@pytest.mark.slow
def test_tensor_parallel_with_zero3_trains_like_data_parallel_and_resumes_exactly(data_parallel, tensor2_zero3):
    assert_same_training(tensor2_zero3, data_parallel)
    assert_exact_resume(tensor2_zero3)
    files, trainer = saved_files(tensor2_zero3)
    assert [f for f in files if f.startswith("zero")] == \
        [f"zero_pp_rank_{d}_mp_rank_0{m}_{kind}_states.pt" for d in range(2) for m in range(2)
         for kind in ("model", "optim")]
    assert trainer["layout"] == {"tensor": 2, "pipeline": 1, "data": 2, "zero_stage": 3}


# ---- refusals (no processes) --------------------------------------------------------------------------------------
def recipe(tmp_path, *extra: str) -> list[str]:
    return [f"run_dir={tmp_path}", "tokenizer=tok.model", "stages.0.data=pairs", "eval.retrieval=null", *extra]


UNSUPPORTED = {
    "pipeline with ZeRO-2": (("parallel.pipeline=2", "parallel.zero_stage=2"), 4,
                             "parallel.pipeline=2 needs ZeRO stage 0 or 1 (DeepSpeed cannot partition gradients "
                             "across pipeline stages); set parallel.zero_stage=1"),
    "pipeline with ZeRO-3": (("parallel.pipeline=2", "parallel.zero_stage=3"), 4, "set parallel.zero_stage=1"),
    "pipeline, ZeRO-0 and clipping": (("parallel.pipeline=2", "parallel.zero_stage=0"), 2,
                                      "set parallel.zero_stage=1 or optim.grad_clip=0"),
    "tensor not dividing the heads": (("parallel.tensor=3",), 3, "model.heads=4 is not divisible by the "
                                                                 "tensor-parallel size 3"),
    "tensor not dividing the vocabulary": (("parallel.tensor=2", "model.vocab_size=1001"), 2,
                                           "set model.vocab_size=1002 (padded) or change parallel.tensor"),
    "more stages than blocks": (("parallel.pipeline=5", "parallel.zero_stage=1"), 5,
                                "parallel.pipeline=5 exceeds model.depth=4"),
    "world not divisible": (("parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"), 6,
                            "parallel: 6 ranks are not divisible by parallel.tensor x parallel.pipeline = 2 x 2 = 4"),
    "pipeline with retrieval evaluation": (("parallel.pipeline=2", "parallel.zero_stage=1", "eval.retrieval=x"), 2,
                                           "eval.retrieval: retrieval evaluation needs the whole model"),
}


@pytest.mark.parametrize("extra, world, message", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_layouts_fail_at_start_up_with_one_line(tmp_path, extra, world, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_image_text", recipe(tmp_path, *extra), world_size=world)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_supported_layout_splits_the_batch_by_data_parallel_ranks(tmp_path):
    cfg = load_config("tiny_image_text", recipe(tmp_path, "parallel.tensor=2", "parallel.pipeline=2",
                                                "parallel.zero_stage=1", "train.global_batch=64"), world_size=8)
    from vlmo_ds.config import stage_plan

    assert stage_plan(cfg, 0, 8 // 4).accumulation == 1  # 32 micro x 1 x 2 data-parallel ranks = 64


def test_pipeline_stages_need_cuda_outside_the_test_shims(tmp_path):
    cfg = load_config("tiny_image_text", recipe(tmp_path, "parallel.pipeline=2", "parallel.zero_stage=1"),
                      world_size=2)
    env = DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, node_rank=0, master_addr="127.0.0.1",
                  master_port=1, launcher="torchrun")
    with pytest.raises(ValueError, match=r"parallel.pipeline=2 needs CUDA devices .*; on CPU set parallel.pipeline=1"):
        place(cfg, env, model_config(cfg, 1000))


def test_a_checkpoint_resumes_only_in_its_layout(tmp_path):
    folder = tmp_path / "step_00000004"
    folder.mkdir()
    saved = {"tensor": 2, "pipeline": 2, "data": 1, "zero_stage": 1}
    (folder / checkpoint.TRAINER_FILE).write_text(json.dumps({"step": 4, "layout": saved}))
    checkpoint.check_layout(folder, saved)
    with pytest.raises(ValueError) as err:
        checkpoint.check_layout(folder, saved | {"pipeline": 1, "data": 2})
    assert str(err.value) == (
        f"checkpoint {folder} was saved in layout tensor 2 x pipeline 2 x data 1 x zero_stage 1, this run is tensor 2 "
        "x pipeline 1 x data 2 x zero_stage 1; run in the saved layout (parallel.tensor, parallel.pipeline, "
        "parallel.zero_stage, the number of ranks), or convert the checkpoint with `python tools/ckpt.py reshard` "
        "and resume from the converted folder")
    (folder / checkpoint.TRAINER_FILE).write_text(json.dumps({"step": 4}))  # saved before layouts were recorded
    checkpoint.check_layout(folder, {"tensor": 1, "pipeline": 1, "data": 4, "zero_stage": 0})
    with pytest.raises(ValueError, match="saved in layout tensor 1 x pipeline 1, this run is tensor 2"):
        checkpoint.check_layout(folder, saved)
