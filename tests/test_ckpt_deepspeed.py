"""The checkpoint tools on real DeepSpeed checkpoints written by gloo ranks (CPU processes).

(a) consolidate under every ZeRO stage and precision (DP = 2, frozen parameters included) gives exactly what the
    engines hold: the gathered float32 masters and AdamW moments;
(b) DP = 2 under ZeRO 3, resharded to one process: resuming gives the losses of continuing the original run;
(c) TP = 2 x PP = 2 (megatron-core's 1F1B schedule, ZeRO 1): consolidated equals the ranks' own shards merged, and
    the single-process model trained the same way; resharded to one process it resumes with the same losses;
(d) a consolidated state resharded to TP = 2 x PP = 2 in bf16 and consolidated back is bit-exact, the optimizer's
    hyper-parameters and the per-rank loader positions (DP unchanged) carried along;
(e) the trainer itself resumes a checkpoint resharded from ZeRO 3 to ZeRO 1 with the uninterrupted run's losses.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from distributed import close_in_norm, global_mean, run_ranks
from vlmo_ds.ckpt import consolidated
from vlmo_ds.ckpt.cli import main
from vlmo_ds.ckpt.consolidate import load
from vlmo_ds.ckpt.consolidated import Consolidated
from vlmo_ds.ckpt.describe import describe
from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.ckpt.layout import Layout
from vlmo_ds.ckpt.reshard import reshard
from vlmo_ds.ckpt.safe_read import load_torch
from vlmo_ds.ckpt.safe_write import OutDir
from vlmo_ds.config.schema import STAGE2_TRAINABLE
from vlmo_ds.model.config import preset
from vlmo_ds.model.published import read_state_dict
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses, text_mlm_losses
from vlmo_ds.parallel.tp_convert import TABLE
from vlmo_ds.train import checkpoint
from vlmo_ds.train.optim import param_groups
from vlmo_ds.train.stage_record import weights_config

CFG = preset("tiny", dim=64, depth=4, heads=4, vlffn_start=3, image_size=32, patch_size=8, vocab_size=96,
             max_text_len=12, table_text_len=16, drop_path_rate=0.0)
BATCH, MICRO, LR, EPS = 4, 2, 1e-3, 1e-8
TP_LR = 1e-4
"""(c)'s learning rate: AdamW moves an element whose gradient is a near-cancelling sum by up to ~1% of lr when
another layout sums it in another order, so agreement with one process to 1e-6 needs a small lr (the exactness of
the tools themselves is checked bit for bit)."""
STAGE = {"step": 2, "stage": "vl", "stage_step": 2, "model": dataclasses.asdict(CFG)}


def start_model() -> VLMo:
    """The model with every bias, gamma, norm and the relative table moved off its initial value."""
    torch.manual_seed(0)
    model = VLMo(CFG)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name == TABLE:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def micro_batches(step: int, rows: int = BATCH) -> list[dict]:
    """The micro-batches of global step `step` (rows each), identical for every layout."""
    g = torch.Generator().manual_seed(100 + step)
    t, out = CFG.max_text_len, []
    for _ in range(MICRO):
        ids = torch.randint(5, CFG.vocab_size, (rows, t), generator=g)
        mask = (torch.arange(t)[None] < torch.randint(5, t + 1, (rows, 1), generator=g)).long()
        ids = ids.masked_fill(mask == 0, 0)
        labels = torch.full_like(ids, -100)
        labels[:, 1:4] = ids[:, 1:4]
        out.append({"image": torch.randn(rows, 3, CFG.image_size, CFG.image_size, generator=g), "text_ids": ids,
                    "text_mask": mask, "mlm_ids": ids.masked_fill(labels != -100, 4), "mlm_labels": labels})
    return out


def ds_config(zero: int, world: int, bf16: bool = False, accumulation: int = 1, micro: int = BATCH) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro * accumulation * world, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": zero}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}



def relink(engine) -> None:
    """DeepSpeed's ZeRO 1-2 link their helpers' views of AdamW's state on the first step before every group has
    one; link again so that safe_get_full_optimizer_state sees every group."""
    if engine.zero_optimization_stage() in (1, 2):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def engine_state(engine) -> dict:
    """What the engine holds, whole: float32 weights (masters where kept) and AdamW's moments by name."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from vlmo_ds.train.stage_record import full_state_dict

    relink(engine)
    moments = {}
    if engine.zero_optimization_stage() == 0:
        optimizer = engine.optimizer
        adam = getattr(optimizer, "optimizer", optimizer)
        names = {id(p): n for n, p in engine.module.named_parameters()}
        pairs = zip(optimizer.fp16_groups, optimizer.fp32_groups) if hasattr(optimizer, "fp32_groups") else \
            [([p for p in group["params"]],) * 2 for group in adam.param_groups]
        for lows, highs in pairs:
            for low, high in zip(lows, highs):
                moments[names[id(low)]] = (adam.state[high]["exp_avg"].clone(), adam.state[high]["exp_avg_sq"].clone())
    else:
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                moments[name] = tuple(safe_get_full_optimizer_state(p, k).float().clone()
                                      for k in ("exp_avg", "exp_avg_sq"))
    return {"weights": full_state_dict(engine), "moments": moments}


# ---- (a) every ZeRO stage and precision ---------------------------------------------------------------------------
CASES = [(0, False, False), (0, True, True), (1, True, False), (2, False, True), (3, False, False), (3, True, True)]


def zero_cases_rank(rank, world, root):
    from vlmo_ds.train.engine import build_engine
    from vlmo_ds.train.freeze import apply_trainable

    found = []
    for zero, bf16, frozen in CASES:
        model = start_model()
        report = apply_trainable(model, STAGE2_TRAINABLE if frozen else "all")
        engine = build_engine(model, ds_config(zero, world, bf16), LR, (0.9, 0.98), EPS, 0.05)
        for step in range(2):
            batch = micro_batches(step, BATCH // world)[rank]
            batch = {k: v.to(torch.bfloat16) if bf16 and v.is_floating_point() else v for k, v in batch.items()}
            out = engine(text_mlm_losses, batch)
            engine.backward(out["loss"])
            engine.step()
        trainer = STAGE | {"layout": {"tensor": 1, "pipeline": 1, "data": world, "zero_stage": zero}}
        trainer |= {"trainable": list(report.groups)} if frozen and zero == 0 else {}
        run = f"{root}/z{zero}_bf16{int(bf16)}_frozen{int(frozen)}"
        checkpoint.save(engine, run, 2, trainer, {"loader": {"rank": rank}}, rank, keep_last=1)
        found.append(engine_state(engine))
    return found


@pytest.mark.slow
def test_consolidate_equals_what_the_engines_hold_under_every_zero_stage(tmp_path):
    ranks = run_ranks(zero_cases_rank, 2, str(tmp_path), use_deepspeed=True)
    for (zero, bf16, frozen), want in zip(CASES, ranks[0]):
        state = load(tmp_path / f"z{zero}_bf16{int(bf16)}_frozen{int(frozen)}")  # the run folder: its latest
        case = (zero, bf16, frozen)
        assert state.layout == Layout(1, 1, 2, zero) and state.precision == ("bf16" if bf16 else "fp32"), case
        assert state.trainer["stage"] == "vl" and sorted(state.rank_files) == [0, 1], case
        assert set(state.weights) == set(want["weights"]), case
        for name, value in want["weights"].items():
            assert torch.equal(state.weights[name], value), (case, name)
        assert set(state.exp_avg) == set(want["moments"]), case
        for name, (avg, avg_sq) in want["moments"].items():
            assert torch.equal(state.exp_avg[name], avg) and torch.equal(state.exp_avg_sq[name], avg_sq), (case, name)
        assert state.step == (3.0 if zero == 0 and bf16 else 2.0), case  # DeepSpeed's bf16 ZeRO 0 steps once at start
        assert {g["name"]: g["weight_decay"] for g in state.groups} == {"decay": 0.05, "no_decay": 0.0}, case
    rows = dict(line.split(None, 1) for line in describe(tmp_path / "z3_bf161_frozen1"))  # the last case's state
    assert rows["parameters"] == f"{sum(v.numel() for v in state.weights.values()):,}"  # ZeRO 3: from param_shapes
    assert rows["precision"] == "bf16 module, fp32 master weights" and rows["layout"] == "TP 1 x PP 1 x DP 2, ZeRO 3"
    frozen_zero0 = tmp_path / "z0_bf161_frozen1" / "checkpoints" / "step_00000002"
    trainer = json.loads((frozen_zero0 / "trainer.json").read_text())
    (frozen_zero0 / "trainer.json").write_text(json.dumps({k: v for k, v in trainer.items() if k != "trainable"}))
    with pytest.raises(CheckpointError, match="ZeRO 0 stores no names: pass --trainable"):
        load(frozen_zero0)
    assert set(load(frozen_zero0, trainable_groups=list(STAGE2_TRAINABLE)).exp_avg) == set(
        ranks[0][1]["moments"])


# ---- (b) DP = 2, ZeRO 3 -> one process -------------------------------------------------------------------------------
def image_text_steps(engine, steps, rank: int, world: int) -> list[float]:
    """Optimizer steps of image_text_losses (gradient accumulation over the micro-batches): global mean losses."""
    losses = []
    for step in steps:
        total = 0.0
        for m, mb in enumerate(micro_batches(step)):
            local = {k: v.chunk(world)[rank] for k, v in mb.items()}
            out = engine(image_text_losses, local, LossWeights(), step * MICRO + m, None)
            engine.backward(out["loss"])
            engine.step()
            total += global_mean(out["loss"]) / MICRO
        losses.append(total)
    return losses


def dp_original_rank(rank, world, run):
    from vlmo_ds.train.engine import build_engine

    engine = build_engine(start_model(), ds_config(3, world, accumulation=MICRO, micro=BATCH // world), LR,
                          (0.9, 0.98), EPS, 0.01)
    image_text_steps(engine, range(2), rank, world)
    trainer = STAGE | {"layout": {"tensor": 1, "pipeline": 1, "data": world, "zero_stage": 3}}
    checkpoint.save(engine, run, 2, trainer, {"loader": {"rank": rank}}, rank, keep_last=1)
    saved = engine_state(engine)
    return {"saved": saved, "continued": image_text_steps(engine, range(2, 4), rank, world)}


def resume_rank(rank, world, folder, zero, lr=LR):
    from vlmo_ds.train.engine import build_engine

    engine = build_engine(start_model(), ds_config(zero, world, accumulation=MICRO, micro=BATCH // world), lr,
                          (0.9, 0.98), EPS, 0.01)
    trainer, state = checkpoint.load(engine, folder, rank)
    return {"trainer": trainer, "loader": state["loader"], "losses": image_text_steps(engine, range(2, 4), rank, world)}


@pytest.mark.slow
def test_dp2_zero3_consolidates_exactly_and_resumes_on_one_process_with_the_same_losses(tmp_path):
    original = run_ranks(dp_original_rank, 2, str(tmp_path / "run"), use_deepspeed=True)
    saved = original[0]["saved"]
    assert main(["consolidate", str(tmp_path / "run"), str(tmp_path / "whole")]) == 0
    weights = read_state_dict(tmp_path / "whole" / "weights.safetensors")
    assert set(weights) == set(saved["weights"])
    assert all(torch.equal(weights[k], v) for k, v in saved["weights"].items())
    assert weights_config(tmp_path / "whole" / "weights.safetensors") == CFG  # what init_from / a stage start reads
    state = consolidated.read(tmp_path / "whole")
    assert all(torch.equal(state.exp_avg[k], v[0]) and torch.equal(state.exp_avg_sq[k], v[1])
               for k, v in saved["moments"].items())
    assert main(["reshard", str(tmp_path / "whole"), str(tmp_path / "one"), "--data", "1", "--zero-stage", "1"]) == 0
    folder = tmp_path / "one" / "checkpoints" / "step_00000002"
    (resumed,) = run_ranks(resume_rank, 1, folder, 1, use_deepspeed=True)
    assert resumed["loader"] is None  # DP changed: the data order restarts
    assert resumed["trainer"]["layout"] == {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 1}
    assert resumed["trainer"]["resharded"]["data_order"] == "restarted"
    assert resumed["losses"] == pytest.approx(original[0]["continued"], rel=1e-5)


# ---- (c) TP = 2 x PP = 2 ------------------------------------------------------------------------------------------
def pipeline_steps(stage, engine, steps) -> list[float]:
    from vlmo_ds.parallel.pipeline_deepspeed import reduce_stage_gradients
    from vlmo_ds.parallel.pipeline_step import image_text_step

    losses = []
    for step in steps:
        out = image_text_step(stage, micro_batches(step), LossWeights(), [step * MICRO + m for m in range(MICRO)])
        reduce_stage_gradients(engine)
        engine.step()
        losses.append(float(out.metrics["loss"]))
    return losses


def tp_pp_rank(rank, world, run, start):
    import deepspeed

    from megatron_cpu import install_cpu_shims
    from vlmo_ds.parallel.mpu import init_model_parallel
    from vlmo_ds.parallel.pipeline_stage import PipelineStage
    from vlmo_ds.parallel.tensor_layers import TensorParallelLayers
    from vlmo_ds.parallel.tp_convert import shard_state_dict

    install_cpu_shims()
    mpu = init_model_parallel(2, 2, CFG, zero_stage=1)
    tp, pp = mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank()
    model = VLMo(CFG, TensorParallelLayers(mpu.get_tensor_model_parallel_group()))
    model.load_state_dict(shard_state_dict(start, tp, 2, CFG))
    stage = PipelineStage(model, pp, 2)
    optimizer = torch.optim.AdamW(param_groups(stage, 0.01), lr=TP_LR, betas=(0.9, 0.98), eps=EPS)
    engine = deepspeed.initialize(model=stage, optimizer=optimizer, config=ds_config(1, 1), mpu=mpu)[0]
    pipeline_steps(stage, engine, range(2))
    trainer = STAGE | {"layout": {"tensor": 2, "pipeline": 2, "data": 1, "zero_stage": 1}}
    checkpoint.save(engine, run, 2, trainer, {"loader": {"rank": rank}}, rank, keep_last=1)
    shard = {k: v.detach().clone() for k, v in stage.state_dict().items()}
    return {"tp": tp, "pp": pp, "mp": engine.checkpoint_mp_rank, "shard": shard,
            "continued": pipeline_steps(stage, engine, range(2, 4))}


def one_process_reference(start: dict) -> dict:
    """Two optimizer steps of the plain model on the same micro-batches (mean of image_text_losses)."""
    model = VLMo(CFG)
    model.load_state_dict(start)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=TP_LR, betas=(0.9, 0.98), eps=EPS)
    for step in range(2):
        optimizer.zero_grad()
        for m, mb in enumerate(micro_batches(step)):
            (image_text_losses(model, mb, LossWeights(), step * MICRO + m)["loss"] / MICRO).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_tensor_by_pipeline_checkpoint_consolidates_exactly_and_resumes_on_one_process(tmp_path):
    start = {k: v.clone() for k, v in start_model().state_dict().items()}
    ranks = run_ranks(tp_pp_rank, 4, str(tmp_path / "run"), start, use_deepspeed=True)
    assert sorted((r["tp"], r["pp"], r["mp"]) for r in ranks) == [(0, 0, 0), (0, 1, 2), (1, 0, 1), (1, 1, 3)]
    state = load(tmp_path / "run")
    assert state.layout == Layout(2, 2, 1, 1)
    rows = dict(line.split(None, 1) for line in describe(tmp_path / "run"))
    assert rows["parameters"] == f"{sum(v.numel() for v in state.weights.values()):,}"
    assert rows["layout"] == "TP 2 x PP 2 x DP 1, ZeRO 1" and rows["step"] == "2 (stage vl, its step 2)"
    from vlmo_ds.parallel.pipeline_convert import merge_stage_state_dicts
    from vlmo_ds.parallel.tp_convert import merge_state_dicts

    by = {(r["tp"], r["pp"]): r["shard"] for r in ranks}
    merged = merge_state_dicts([merge_stage_state_dicts([by[(t, 0)], by[(t, 1)]], CFG) for t in (0, 1)], CFG)
    assert set(state.weights) == set(merged)
    assert all(torch.equal(state.weights[k], v) for k, v in merged.items())  # consolidate is the exact merge
    reference = one_process_reference(start)
    for name, value in reference.items():
        assert close_in_norm(state.weights[name], value), name
    folder = reshard(state, tmp_path / "one", Layout(1, 1, 1, 1))
    (resumed,) = run_ranks(resume_rank, 1, folder, 1, TP_LR, use_deepspeed=True)
    assert resumed["losses"] == pytest.approx(ranks[0]["continued"], rel=1e-5)


# ---- (d) consolidated -> TP = 2 x PP = 2, bf16 -> back --------------------------------------------------------------
@pytest.mark.slow
def test_reshard_to_tensor_by_pipeline_and_back_is_exact(tmp_path):
    weights = {k: v.clone() for k, v in start_model().state_dict().items()}
    g = torch.Generator().manual_seed(3)
    exp_avg = {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    exp_avg_sq = {k: 1e-6 * torch.rand(v.shape, generator=g) for k, v in weights.items()}
    torch.save({"loader": json.dumps({"batches": 5}), "rng": checkpoint.rng_state()}, tmp_path / "rank_0.pt")
    groups = [{"name": "decay", "lr": LR, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.05},
              {"name": "no_decay", "lr": LR, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.0}]
    source = Consolidated(CFG, weights, exp_avg, exp_avg_sq, 5.0, groups, {"step": 5, "stage": "vl", "stage_step": 5},
                          Layout(1, 1, 1, 0), "fp32", rank_files={0: tmp_path / "rank_0.pt"}, source="synthetic")
    consolidated.write(source, OutDir(tmp_path / "source"))
    folder = reshard(consolidated.read(tmp_path / "source"), tmp_path / "tp_pp", Layout(2, 2, 1, 1), "bf16")
    back = load(folder)
    assert back.layout == Layout(2, 2, 1, 1) and back.precision == "bf16" and back.step == 5.0
    for ours, theirs in ((back.weights, weights), (back.exp_avg, exp_avg), (back.exp_avg_sq, exp_avg_sq)):
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())
    assert {g["name"]: (g["betas"], g["eps"], g["weight_decay"]) for g in back.groups} == {
        "decay": ([0.9, 0.95], 1e-6, 0.05), "no_decay": ([0.9, 0.95], 1e-6, 0.0)}
    for rank in range(4):  # DP unchanged: every rank of the replica continues the saved loader position
        assert json.loads(load_torch(folder / f"rank_{rank}.pt")["loader"]) == {"batches": 5}
    trainer = json.loads((folder / "trainer.json").read_text())
    assert trainer["resharded"] == {"from": {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 0},
                                    "source": str(tmp_path / "source"), "optimizer": "carried", "data_order": "kept"}
    assert trainer["model"] == dataclasses.asdict(CFG) and trainer["stage_step"] == 5


# ---- (e) through the trainer --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_trainer_resumes_a_resharded_checkpoint_with_the_same_losses(run_data, tmp_path):
    """The tiny_image_text recipe under ZeRO 3, its step-2 checkpoint resharded to ZeRO 1 with the command line,
    resumed by `python -m vlmo_ds.train`: steps 3 and 4 log the uninterrupted run's losses."""
    import subprocess
    import sys

    from train_cli import ENV, losses, recipe_args, train_command

    def train(run_dir, *extra):
        subprocess.run(train_command(*recipe_args(run_data, run_dir, 4, 4, *extra)), check=True, env=ENV,
                       capture_output=True)

    train(tmp_path / "whole", "parallel.zero_stage=3", "deepspeed=ds_configs/zero3_fp32.json")
    tool = Path(__file__).resolve().parents[1] / "tools" / "ckpt.py"
    saved = tmp_path / "whole" / "checkpoints" / "step_00000002"
    subprocess.run([sys.executable, str(tool), "reshard", str(saved), str(tmp_path / "zero1"), "--data", "1",
                    "--zero-stage", "1"], check=True, env=ENV, capture_output=True)
    train(tmp_path / "resumed", "parallel.zero_stage=1", "deepspeed=ds_configs/zero1_fp32.json",
          f"train.resume={tmp_path / 'zero1' / 'checkpoints' / 'step_00000002'}")
    want, got = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted(got) == [3, 4]
    assert [got[3], got[4]] == pytest.approx([want[3], want[4]], rel=1e-6)
