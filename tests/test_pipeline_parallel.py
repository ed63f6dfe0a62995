"""Pipeline parallelism (megatron-core's 1F1B schedule on gloo ranks) computes what the single-process model computes.

(a) pure pieces: block split, stage <-> consolidated conversion (bit-exact, hand-checked table columns), layout
errors as one clear line; (b) PP=2 and TP=2 x PP=2 (activation checkpointing on): from the same consolidated
weights, 3 AdamW steps of 2 micro-batches each give the single-process losses, the same ITM negatives, the same
first-step gradients and gradient norm (counted with the mpu's groups as DeepSpeed counts them) and the same final
weights; the forward work (block calls) equals the single-process step's; the text-MLM and MIM steps match too;
(c) PP=2 x DP=2 under DeepSpeed ZeRO-1 with the mpu (DeepSpeed clips and steps) equals one process on the global
batch.
"""
import pytest
import torch
import torch.distributed as dist

from distributed import close_in_norm, run_ranks
from vlmo_ds.model.config import preset
from vlmo_ds.model.layers import Layers
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.itc import contrastive_loss
from vlmo_ds.objectives.itm import sample_hard_negatives
from vlmo_ds.objectives.pretrain import LossWeights, image_mim_losses, image_text_losses, text_mlm_losses
from vlmo_ds.parallel.checkpointing import set_activation_checkpointing
from vlmo_ds.parallel.mpu import check_layout, check_pipeline_device
from vlmo_ds.parallel.pipeline_convert import merge_stage_state_dicts, stage_of_key, stage_state_dict
from vlmo_ds.parallel.pipeline_passes import count_block_calls, image_text_passes
from vlmo_ds.parallel.pipeline_stage import PipelineStage, split_blocks
from vlmo_ds.parallel.tp_convert import TABLE, merge_state_dicts, shard_state_dict
from vlmo_ds.train.optim import param_groups


def tiny(vlffn_start: int, **changes):
    return preset("tiny", **{"dim": 64, "depth": 4, "heads": 4, "vlffn_start": vlffn_start, "image_size": 32,
                             "patch_size": 8, "vocab_size": 96, "max_text_len": 12, "table_text_len": 16,
                             "drop_path_rate": 0.0} | changes)


STEPS, MICRO, BATCH, LR, CLIP = 3, 2, 4, 1e-3, 0.5
KEYS = ("loss", "itc", "itm", "mlm", "itc_i2t_acc", "itc_t2i_acc", "mlm_acc", "itm_acc")


def full_model(cfg) -> VLMo:
    """The model with every bias, gamma, norm and the relative table moved off its initial value."""
    torch.manual_seed(0)
    model = VLMo(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name == TABLE:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def micro_batches(cfg, step: int, dp_rank: int = 0) -> list[dict]:
    """The micro-batches of one optimizer step on data-parallel rank `dp_rank`."""
    g = torch.Generator().manual_seed(100 + 10 * step + dp_rank)
    t, out = cfg.max_text_len, []
    for _ in range(MICRO):
        ids = torch.randint(5, cfg.vocab_size, (BATCH, t), generator=g)
        mask = (torch.arange(t)[None] < torch.randint(5, t + 1, (BATCH, 1), generator=g)).long()
        ids = ids.masked_fill(mask == 0, 0)
        labels = torch.full_like(ids, -100)
        labels[:, 1:4] = ids[:, 1:4]
        patch_mask = torch.rand(BATCH, cfg.num_patches, generator=g) < 0.4
        out.append({"image": torch.randn(BATCH, 3, cfg.image_size, cfg.image_size, generator=g), "text_ids": ids,
                    "text_mask": mask, "mlm_ids": ids.masked_fill(labels != -100, 4), "mlm_labels": labels,
                    "patch_mask": patch_mask})
    return out


def global_batches(cfg, step: int, dp: int) -> list[dict]:
    """The one-process equivalent of `dp` data-parallel ranks: their micro-batches concatenated in rank order."""
    ranks = [micro_batches(cfg, step, r) for r in range(dp)]
    return [{k: torch.cat([rank[m][k] for rank in ranks]) for k in ranks[0][m]} for m in range(MICRO)]


def seed_of(step: int, m: int) -> int:
    return step * MICRO + m


def clip_(params, mp_group=None, tp_rank: int = 0) -> float:
    """Clip to CLIP by the global norm, counted as DeepSpeed's ZeRO counts it with an mpu: TP-sharded tensors on
    every rank, replicated ones on tensor rank 0 only, summed over the model-parallel (TP x PP) group."""
    grads = [p for p in params if p.grad is not None]
    square = sum(p.grad.pow(2).sum() for p in grads if getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
    if mp_group is not None:
        dist.all_reduce(square, group=mp_group)
    norm = square.sqrt()
    coef = (CLIP / (norm + 1e-6)).clamp(max=1.0)
    for p in grads:
        p.grad.mul_(coef)
    return norm.item()


def grads_of(module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def reference(cfg, dp: int = 1) -> dict:
    """One process: per step the mean over micro-batches of image_text_losses (gradient accumulation) over the
    batches of `dp` data-parallel ranks."""
    model = full_model(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=LR, betas=(0.9, 0.98), eps=1e-8)
    log, negatives, first_grads, calls = [], [], None, 0
    for step in range(STEPS):
        opt.zero_grad()
        per_micro = []
        for m, mb in enumerate(global_batches(cfg, step, dp)):
            with torch.no_grad():
                img, _ = model.itc_image(model.encode_image(mb["image"]))
                txt, _ = model.itc_text(model.encode_text(mb["text_ids"], mb["text_mask"]))
                itc = contrastive_loss(img, txt, model.logit_scale)
                negatives.append([t.tolist() for t in sample_hard_negatives(itc, seed_of(step, m), dp * BATCH)])
            with count_block_calls(model) as counted:
                out = image_text_losses(model, mb, LossWeights(), seed_of(step, m))
            calls += sum(counted.values()) if step == 0 else 0
            (out["loss"] / MICRO).backward()
            per_micro.append({k: out[k].item() for k in KEYS})
        if step == 0:
            first_grads = grads_of(model)
        norm = clip_(model.parameters())
        opt.step()
        log.append({k: sum(p[k] for p in per_micro) / MICRO for k in KEYS} | {"norm": norm})
    return {"start": start, "log": log, "negatives": negatives, "grads": first_grads, "calls": calls,
            "final": {k: v.clone() for k, v in model.state_dict().items()}}


UNIMODAL = {"text": text_mlm_losses, "image": image_mim_losses}


def reference_unimodal(cfg, state, names) -> dict:
    """One step of text MLM and / or MIM (2 micro-batches each): losses and gradients."""
    out = {}
    for name in names:
        fn = UNIMODAL[name]
        model = VLMo(cfg)
        model.load_state_dict(state)
        losses = [fn(model, mb) for mb in micro_batches(cfg, 0)]
        sum(o["loss"] / MICRO for o in losses).backward()
        out[name] = {"loss": sum(o["loss"].item() for o in losses) / MICRO, "grads": grads_of(model)}
    return out


# ---- workers -------------------------------------------------------------------------------------------------------
def build_stage(cfg, state, mpu):
    from vlmo_ds.parallel.tensor_layers import TensorParallelLayers

    tp, tp_rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    torch.manual_seed(5)  # the initial values are overwritten below
    model = VLMo(cfg, TensorParallelLayers(mpu.get_tensor_model_parallel_group()) if tp > 1 else Layers())
    model.load_state_dict(shard_state_dict(state, tp_rank, tp, cfg), strict=True)
    return PipelineStage(model, mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size())


def train_stage(cfg, state, mpu, checkpoint_every: int) -> dict:
    from vlmo_ds.parallel.pipeline_step import image_text_step

    stage = build_stage(cfg, state, mpu)
    set_activation_checkpointing(stage, checkpoint_every)
    opt = torch.optim.AdamW(param_groups(stage, 0.01), lr=LR, betas=(0.9, 0.98), eps=1e-8)
    log, negatives, first_grads, calls = [], [], None, 0
    for step in range(STEPS):
        opt.zero_grad()
        with count_block_calls(stage) as counted:
            out = image_text_step(stage, micro_batches(cfg, step), LossWeights(),
                                  [seed_of(step, m) for m in range(MICRO)])
        calls = calls or sum(counted.values())
        negatives += [[t.tolist() for t in pair] for pair in out.negatives]
        if step == 0:
            first_grads = grads_of(stage)
        norm = clip_(stage.parameters(), mpu.get_model_parallel_group(), mpu.get_tensor_model_parallel_rank())
        opt.step()
        log.append({k: float(out.metrics[k]) for k in KEYS} | {"norm": norm})
    return {"log": log, "negatives": negatives, "grads": first_grads, "calls": calls,
            "state": {k: v.detach().clone() for k, v in stage.state_dict().items()}}


def unimodal_steps(cfg, state, mpu, names) -> dict:
    from vlmo_ds.parallel.pipeline_step import image_mim_step, text_mlm_step

    out = {}
    for name in names:
        step = {"text": text_mlm_step, "image": image_mim_step}[name]
        stage = build_stage(cfg, state, mpu)
        result = step(stage, micro_batches(cfg, 0))
        out[name] = {"loss": float(result.metrics["loss"]), "grads": grads_of(stage)}
    return out


def deepspeed_rank_fn(rank, world, cfg, state):
    """PP=2 x DP=2: the stage under a DeepSpeed ZeRO-1 engine given the mpu; DeepSpeed clips and steps."""
    import deepspeed

    from megatron_cpu import install_cpu_shims
    from vlmo_ds.parallel.mpu import init_model_parallel
    from vlmo_ds.parallel.pipeline_deepspeed import reduce_stage_gradients
    from vlmo_ds.parallel.pipeline_step import image_text_step

    install_cpu_shims()
    mpu = init_model_parallel(1, 2, cfg, zero_stage=1)
    stage = build_stage(cfg, state, mpu)
    optimizer = torch.optim.AdamW(param_groups(stage, 0.01), lr=LR, betas=(0.9, 0.98), eps=1e-8)
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
              "zero_optimization": {"stage": 1}}
    engine = deepspeed.initialize(model=stage, optimizer=optimizer, config=config, mpu=mpu)[0]
    dp_rank, log, negatives = mpu.get_data_parallel_rank(), [], []
    for step in range(STEPS):
        out = image_text_step(stage, micro_batches(cfg, step, dp_rank), LossWeights(),
                              [seed_of(step, m) for m in range(MICRO)])
        reduce_stage_gradients(engine)
        engine.step()
        log.append({k: float(out.metrics[k]) for k in KEYS} | {"norm": float(engine.get_global_grad_norm())})
        negatives += [[t.tolist() for t in pair] for pair in out.negatives]
    return {"layout": {"tp": 0, "pp": mpu.get_pipeline_model_parallel_rank(), "dp": dp_rank}, "log": log,
            "negatives": negatives, "state": {k: v.detach().clone() for k, v in stage.state_dict().items()}}


def pipeline_rank_fn(rank, world, tp, pp, cases):
    from megatron_cpu import install_cpu_shims
    from vlmo_ds.parallel.mpu import init_model_parallel

    install_cpu_shims()
    mpu = init_model_parallel(tp, pp, cases[0]["cfg"], zero_stage=1)
    layout = {"tp": mpu.get_tensor_model_parallel_rank(), "pp": mpu.get_pipeline_model_parallel_rank(),
              "mp": (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()),
              "dp": (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(),
                     mpu.get_data_parallel_group_ranks()),
              "pipe": (mpu.get_pipe_parallel_rank(), mpu.get_pipe_parallel_world_size())}
    results = []
    for case in cases:
        cfg, state, unimodal = case["cfg"], case["state"], case["unimodal"]
        result = train_stage(cfg, state, mpu, case["checkpoint_every"])
        if unimodal:
            result["unimodal"] = unimodal_steps(cfg, state, mpu, unimodal)
        results.append(result)
    return {"layout": layout, "results": results}


# ---- checks --------------------------------------------------------------------------------------------------------
def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Largest difference relative to the tensor's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() < rel



def consolidate(ranks: list[dict], part, cfg, tp: int) -> dict:
    """Merge the stages of every tensor rank, then the tensor ranks; part(rank result) is the state or grads."""
    shards = []
    for t in range(tp):
        stages = sorted((r for r in ranks if r["layout"]["tp"] == t), key=lambda r: r["layout"]["pp"])
        shards.append(merge_stage_state_dicts([part(r) for r in stages], cfg))
    return merge_state_dicts(shards, cfg) if tp > 1 else shards[0]


def check_against_reference(ranks, ref, cfg, case, tp):
    for r in ranks:
        got = r["results"][case]
        for step, (mine, want) in enumerate(zip(got["log"], ref["log"])):
            for key in KEYS + ("norm",):
                assert mine[key] == pytest.approx(want[key], rel=1e-5), (case, step, key)
        assert got["negatives"] == ref["negatives"], case
    calls = sum(r["results"][case]["calls"] for r in ranks if r["layout"]["tp"] == 0)
    assert calls == ref["calls"] == MICRO * image_text_passes(cfg.depth, cfg.vlffn_start) * cfg.depth
    grads = consolidate(ranks, lambda r: r["results"][case]["grads"], cfg, tp)
    assert set(grads) == set(ref["grads"])
    for name, grad in ref["grads"].items():
        assert close(grads[name], grad), (case, name)
    final = consolidate(ranks, lambda r: r["results"][case]["state"], cfg, tp)
    assert set(final) == set(ref["final"])
    for key, value in ref["final"].items():
        assert close_in_norm(final[key], value), (case, key)


def run_layout(tp, pp, cases):
    """cases: {"cfg", "unimodal": steps also checked ("text", "image"), "checkpoint_every": activation
    checkpointing of the stages' blocks (0 off)}."""
    refs = [reference(case["cfg"]) for case in cases]
    ranks = run_ranks(pipeline_rank_fn, tp * pp, tp, pp, [case | {"state": ref["start"]}
                                                          for case, ref in zip(cases, refs)])
    for case, (spec, ref) in enumerate(zip(cases, refs)):
        cfg, unimodal = spec["cfg"], spec["unimodal"]
        assert ref["log"][0]["norm"] > CLIP  # clipping is exercised
        check_against_reference(ranks, ref, cfg, case, tp)
        if unimodal:
            want = reference_unimodal(cfg, ref["start"], unimodal)
            for name in unimodal:
                for r in ranks:
                    assert r["results"][case]["unimodal"][name]["loss"] == pytest.approx(want[name]["loss"],
                                                                                         rel=1e-5)
                grads = consolidate(ranks, lambda r: r["results"][case]["unimodal"][name]["grads"], cfg, tp)
                assert set(grads) == set(want[name]["grads"]), name
                for key, grad in want[name]["grads"].items():
                    assert close(grads[key], grad), (name, key)
    return ranks


@pytest.mark.slow
def test_two_stages_equal_one_process():
    # vlffn_start 1: the VL copies are taken in stage 0 and cross the boundary (4 streams). (vlffn_start 2, copies
    # taken entering stage 1, is the DeepSpeed test's model; 3, inside stage 1, the TP x PP test's.)
    ranks = run_layout(1, 2, [{"cfg": tiny(1, mim_targets="pixels"), "unimodal": ("text", "image"),
                               "checkpoint_every": 0}])
    layouts = sorted((r["layout"]["pp"], r["layout"]["mp"], r["layout"]["dp"], r["layout"]["pipe"]) for r in ranks)
    assert layouts == [(0, (0, 2), (0, 1, [0]), (0, 2)), (1, (1, 2), (0, 1, [1]), (1, 2))]


@pytest.mark.slow
def test_tensor_by_pipeline_equals_one_process():
    # vlffn_start 3: the VL copies are taken inside stage 1; text MLM checks the vocabulary-parallel loss under PP;
    # every block checkpointed: recomputation with megatron's layers inside the 1F1B schedule.
    ranks = run_layout(2, 2, [{"cfg": tiny(3), "unimodal": ("text",), "checkpoint_every": 1}])
    layouts = sorted((r["layout"]["tp"], r["layout"]["pp"], r["layout"]["mp"][1]) for r in ranks)
    assert layouts == [(0, 0, 4), (0, 1, 4), (1, 0, 4), (1, 1, 4)]


@pytest.mark.slow
def test_two_stages_by_two_replicas_under_deepspeed_zero1_equal_one_process():
    cfg = tiny(2)
    ref = reference(cfg, dp=2)
    ranks = run_ranks(deepspeed_rank_fn, 4, cfg, ref["start"], use_deepspeed=True)
    assert sorted((r["layout"]["pp"], r["layout"]["dp"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for step, want in enumerate(ref["log"]):
        for key in KEYS:  # each replica reports its own rows; equal sizes: their mean is the global value
            mean = sum(r["log"][step][key] for r in ranks if r["layout"]["pp"] == 0) / 2
            assert mean == pytest.approx(want[key], rel=1e-5), (step, key)
        for r in ranks:
            assert r["log"][step]["norm"] == pytest.approx(want["norm"], rel=1e-5), step
    for r in ranks:  # replica d drew the negatives of global rows [d*B, (d+1)*B)
        rows = slice(r["layout"]["dp"] * BATCH, (r["layout"]["dp"] + 1) * BATCH)
        assert r["negatives"] == [[side[rows] for side in pair] for pair in ref["negatives"]]
    final = consolidate([r for r in ranks if r["layout"]["dp"] == 0], lambda r: r["state"], cfg, 1)
    for key, value in ref["final"].items():
        assert close_in_norm(final[key], value), key


# ---- pure pieces ---------------------------------------------------------------------------------------------------
def test_blocks_split_into_contiguous_balanced_stages():
    assert split_blocks(4, 2) == [range(0, 2), range(2, 4)]
    assert split_blocks(24, 5) == [range(0, 5), range(5, 10), range(10, 15), range(15, 20), range(20, 24)]
    assert split_blocks(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="parallel.pipeline=5 must be between 1 and model.depth=4"):
        split_blocks(4, 5)


def test_stage_state_dicts_hold_their_keys_and_merge_back_bit_exactly():
    cfg = tiny(2, mim_targets="pixels")
    full = full_model(cfg).state_dict()
    h = cfg.heads
    for stages in (1, 2, 3, 4):
        parts = [stage_state_dict(full, cfg, s, stages) for s in range(stages)]
        for s, part in enumerate(parts):  # the rule equals what a built stage holds
            model = VLMo(cfg)
            assert set(part) == set(PipelineStage(model, s, stages).state_dict()), (stages, s)
        merged = merge_stage_state_dicts(parts, cfg)
        assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)
    parts = [stage_state_dict(full, cfg, s, 3) for s in range(3)]  # blocks [0, 1], [2], [3]
    assert torch.equal(parts[1][TABLE], full[TABLE][:, 2 * h : 3 * h])
    assert "transformer.blocks.2.mlp_vl.fc1.weight" in parts[1] and "transformer.cls_token" in parts[0]
    assert "transformer.norm.weight" in parts[2] and "mlm_score.bias" in parts[2] and "logit_scale" in parts[2]
    keys = ("transformer.mask_token", "text_embeddings.LayerNorm.bias", "transformer.blocks.1.gamma_1",
            "itc_text_proj.fc.weight")
    assert [stage_of_key(k, cfg, 3) for k in keys] == [0, 0, 0, 2]
    # a TP shard cuts the same way: its table holds h = H / t heads per layer
    shard = shard_state_dict(full, 1, 2, cfg)
    assert torch.equal(stage_state_dict(shard, cfg, 1, 2)[TABLE], shard[TABLE][:, 2 * 2 :])
    with pytest.raises(ValueError, match="transformer.norm.weight belongs to stage 1 of 2 but came in stage 0"):
        merge_stage_state_dicts([{"transformer.norm.weight": torch.zeros(1)}, {}], cfg)


def test_bad_layouts_fail_with_one_clear_line():
    cfg = tiny(2)
    assert check_layout(8, 2, 2, 1, cfg) == 2
    cases = [((6, 2, 2, 1), r"6 ranks are not divisible by parallel.tensor x parallel.pipeline = 2 x 2 = 4"),
             ((4, 1, 2, 2), r"parallel.pipeline=2 needs ZeRO stage 0 or 1 \(DeepSpeed cannot partition gradients "
                            r"across pipeline stages\); set parallel.zero_stage=1"),
             ((4, 1, 2, 3), r"set parallel.zero_stage=1"),
             ((8, 1, 8, 0), r"parallel.pipeline=8 exceeds model.depth=4 .*; set parallel.pipeline to at most 4"),
             ((3, 3, 1, 3), r"model.heads=4 is not divisible by the tensor-parallel size 3"),
             ((2, 0, 1, 0), r"parallel.tensor=0 must be at least 1"),
             ((2, 1, 1, 4), r"parallel.zero_stage=4 must be 0, 1, 2 or 3")]
    with pytest.raises(ValueError, match=r"parallel.pipeline=2 with ZeRO stage 0 clips by a wrong gradient norm .*; "
                                         r"set parallel.zero_stage=1 or optim.grad_clip=0"):
        check_layout(4, 1, 2, 0, cfg, grad_clip=1.0)
    assert check_layout(4, 1, 2, 0, cfg) == 2 and check_layout(4, 2, 1, 0, cfg, grad_clip=1.0) == 2
    for args, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            check_layout(*args, cfg)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"vocab_size=97 .* pad the vocabulary to model.vocab_size=98"):
        check_layout(2, 2, 1, 3, tiny(2, vocab_size=97))
    assert check_layout(4, 2, 2, None, cfg) == 1  # ZeRO stage not known yet: not checked
    with pytest.raises(ValueError, match=r"parallel.pipeline=2 needs CUDA devices .*; on CPU set parallel.pipeline=1"):
        check_pipeline_device(2, cuda_available=False)
    check_pipeline_device(1, cuda_available=False)
    check_pipeline_device(2, cuda_available=True)
