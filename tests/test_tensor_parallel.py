"""Tensor parallelism (megatron-core, 2 gloo ranks) computes what the single-process model computes.

(a) consolidated <-> shard conversion: hand-checked layout, bit-exact round trip; (b) TP=2 from the same consolidated
weights: same ITC/ITM/MLM losses, same hard negatives, equal replicated gradients on both ranks, and after 3 AdamW
steps with TP-aware gradient clipping the merged weights equal the single-process weights; (c) clear errors.
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
from vlmo_ds.objectives.mlm import masked_lm_loss
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses
from vlmo_ds.parallel.tp_convert import (TABLE, check_tensor_parallel, merge_state_dicts, partition_dim,
                                         shard_state_dict)
from vlmo_ds.train.optim import param_groups

CFG = preset("tiny", dim=64, depth=2, heads=4, vlffn_start=1, image_size=32, patch_size=8, vocab_size=96,
             max_text_len=12, table_text_len=16, drop_path_rate=0.0)
TP, STEPS, BATCH, LR, CLIP = 2, 3, 4, 1e-3, 0.5
LOSSES = ("itc", "itm", "mlm", "loss")


def full_model() -> VLMo:
    """The tiny model with every bias, gamma, norm and the relative table moved off its initial value."""
    torch.manual_seed(0)
    model = VLMo(CFG)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name == TABLE:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def batches() -> list[dict]:
    g = torch.Generator().manual_seed(2)
    t, out = CFG.max_text_len, []
    for _ in range(STEPS):
        ids = torch.randint(5, CFG.vocab_size, (BATCH, t), generator=g)
        mask = (torch.arange(t)[None] < torch.randint(5, t + 1, (BATCH, 1), generator=g)).long()
        ids = ids.masked_fill(mask == 0, 0)
        labels = torch.full_like(ids, -100)
        labels[:, 1:4] = ids[:, 1:4]
        out.append({"image": torch.randn(BATCH, 3, CFG.image_size, CFG.image_size, generator=g), "text_ids": ids,
                    "text_mask": mask, "mlm_ids": ids.masked_fill(labels != -100, 4), "mlm_labels": labels})
    return out


def hard_negatives(model, batch, group) -> list[list[int]]:
    with torch.no_grad():
        img, _ = model.itc_image(model.encode_image(batch["image"]))
        txt, _ = model.itc_text(model.encode_text(batch["text_ids"], batch["text_mask"]))
        itc = contrastive_loss(img, txt, model.logit_scale, group)
        return [t.tolist() for t in sample_hard_negatives(itc, seed=0, local_batch=BATCH, group=group)]


def clip_(model, tp_group=None) -> float:
    """torch's clip_grad_norm_ rule over the global norm; a tensor-parallel shard's squares are summed over the
    group (megatron's `tensor_model_parallel` attribute), a replicated tensor counts once."""
    grads = [p for p in model.parameters() if p.grad is not None]
    sharded = sum(p.grad.pow(2).sum() for p in grads if getattr(p, "tensor_model_parallel", False))
    whole = sum(p.grad.pow(2).sum() for p in grads if not getattr(p, "tensor_model_parallel", False))
    if tp_group is not None:
        dist.all_reduce(sharded, group=tp_group)
    norm = (sharded + whole).sqrt()
    coef = (CLIP / (norm + 1e-6)).clamp(max=1.0)
    for p in grads:
        p.grad.mul_(coef)
    return norm.item()


def train(model, group=None, tp_group=None):
    """STEPS AdamW steps; per step the losses, accuracies and gradient norm, and the first step's gradients."""
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=LR, betas=(0.9, 0.98), eps=1e-8)
    log, first_grads = [], None
    for step, batch in enumerate(batches()):
        out = image_text_losses(model, batch, LossWeights(), seed=step, group=group, tp_group=tp_group)
        opt.zero_grad()
        out["loss"].backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = clip_(model, tp_group)
        opt.step()
        log.append({k: out[k].item() for k in LOSSES + ("mlm_acc", "itm_acc")} | {"norm": norm})
    return log, first_grads


def mlm_logits_case() -> tuple[torch.Tensor, torch.Tensor]:
    """[6, V] logits with a tie across the two vocabulary halves (row 0: ids 10 and 60), a maximum in the second
    half (row 1) and one wrong target (row 2): accuracy 5/6 only if the argmax keeps torch's first-maximum rule."""
    logits = torch.randn(6, CFG.vocab_size, generator=torch.Generator().manual_seed(4))
    logits[0, 10] = logits[0, 60] = logits[1, 70] = 9.0
    targets = logits.argmax(-1)
    targets[2] = (targets[2] + 1) % CFG.vocab_size
    return logits, targets


def cpu_rng_tracker_works() -> bool:
    """megatron's tracker is the CPU shim: forks continue one named stream and leave the default stream alone."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.add("model-parallel-rng", 123)
    outer = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    with tracker.fork():
        second = torch.rand(3)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(123))
    return (torch.cuda.current_device() == "cpu" and torch.equal(torch.cat([first, second]), expected)
            and torch.equal(outer, torch.get_rng_state()))


def tp_rank_fn(rank, world, full_state):
    from megatron.core import parallel_state

    from megatron_cpu import init_megatron
    from vlmo_ds.parallel.tensor_layers import TensorParallelLayers

    init_megatron(tensor=world)
    tp_group, dp_group = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_data_parallel_group()
    assert dist.get_world_size(dp_group) == 1
    rng_ok = cpu_rng_tracker_works()
    torch.manual_seed(5)  # the shard's own initial values are overwritten below
    model = VLMo(CFG, TensorParallelLayers(tp_group))
    model.load_state_dict(shard_state_dict(full_state, rank, world, CFG), strict=True)
    attributes = {n: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
                  for n, p in model.named_parameters()}
    negatives = hard_negatives(model, batches()[0], dp_group)
    log, grads = train(model, dp_group, tp_group)
    logits, targets = mlm_logits_case()
    mlm = masked_lm_loss(torch.zeros(1, 6, 1), targets[None], lambda x: logits.chunk(world, -1)[rank].clone(),
                         tp_group)
    try:
        VLMo(CFG.replace(vocab_size=97), TensorParallelLayers(tp_group))
        vocab_error = None
    except ValueError as err:
        vocab_error = str(err)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"log": log, "state": state, "negatives": negatives, "grads": grads,
            "attributes": attributes, "mlm": [t.item() for t in mlm], "rng_ok": rng_ok, "vocab_error": vocab_error}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Largest difference relative to the tensor's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() < rel



# ---- (a) conversion ---------------------------------------------------------------------------------------------
def test_shards_hold_the_right_rows_and_columns_and_merge_back_bit_exactly():
    full = full_model().state_dict()
    shards = [shard_state_dict(full, r, TP, CFG) for r in range(TP)]
    d, hd = CFG.dim, CFG.head_dim
    qkv = full["transformer.blocks.0.attn.qkv.weight"]  # published rows [q ; k ; v], heads 0-3 of 16 rows each
    q, k, v = qkv[:d], qkv[d : 2 * d], qkv[2 * d :]
    assert torch.equal(shards[1]["transformer.blocks.0.attn.qkv.weight"],
                       torch.cat([q[2 * hd :], k[2 * hd :], v[2 * hd :]]))
    assert torch.equal(shards[0]["transformer.blocks.0.attn.q_bias"], full["transformer.blocks.0.attn.q_bias"][:32])
    # depth 2 x 4 heads: rank 1 holds heads 2, 3 of layer 0 and heads 2, 3 of layer 1
    assert torch.equal(shards[1][TABLE], full[TABLE][:, [2, 3, 6, 7]])
    assert torch.equal(shards[1]["transformer.blocks.1.mlp_vl.fc2.weight"],
                       full["transformer.blocks.1.mlp_vl.fc2.weight"][:, CFG.mlp_dim // 2 :])
    assert torch.equal(shards[1]["mlm_score.bias"], full["mlm_score.bias"][48:])
    assert torch.equal(shards[0]["transformer.blocks.0.attn.proj.bias"], full["transformer.blocks.0.attn.proj.bias"])
    merged = merge_state_dicts(shards, CFG)
    assert list(merged) == list(full)
    assert all(torch.equal(merged[k], full[k]) for k in full)
    assert all(torch.equal(a, full[k]) for k, a in shard_state_dict(full, 0, 1, CFG).items())


# ---- (b) two tensor-parallel ranks --------------------------------------------------------------------------------
@pytest.mark.slow
def test_tensor_parallel_training_equals_one_process():
    ref = full_model()
    full_state = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_negatives = hard_negatives(ref, batches()[0], None)
    ref_log, ref_grads = train(ref)
    ranks = run_ranks(tp_rank_fn, TP, full_state)

    assert ref_log[0]["norm"] > CLIP  # clipping is exercised
    logits, targets = mlm_logits_case()
    ref_mlm = masked_lm_loss(torch.zeros(1, 6, 1), targets[None], lambda x: logits.clone())
    assert ref_mlm[1].item() == pytest.approx(5 / 6)
    for r in ranks:
        assert r["negatives"] == ref_negatives
        for step, (got, want) in enumerate(zip(r["log"], ref_log)):
            for key in LOSSES + ("norm",):
                assert got[key] == pytest.approx(want[key], rel=1e-5), (step, key)
            assert got["mlm_acc"] == want["mlm_acc"] and got["itm_acc"] == want["itm_acc"]
        # every tensor the conversion splits is marked as a shard in the model, and nothing else
        assert r["attributes"] == {n: partition_dim(n) for n in r["attributes"]}
        assert r["mlm"][0] == pytest.approx(ref_mlm[0].item(), rel=1e-6) and r["mlm"][1] == ref_mlm[1].item()
        assert r["rng_ok"]
        assert r["vocab_error"] is not None and "vocab_size=97" in r["vocab_error"]
    for name, grad in ranks[0]["grads"].items():  # replicated tensors: equal gradients on every TP rank
        if partition_dim(name) is None:
            assert torch.equal(grad, ranks[1]["grads"][name]), name
    grads = merge_state_dicts([r["grads"] for r in ranks], CFG)
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert close(grads[name], grad), name
    merged = merge_state_dicts([r["state"] for r in ranks], CFG)
    final = ref.state_dict()
    assert set(merged) == set(final)
    for key, value in final.items():
        assert close_in_norm(merged[key], value), key


# ---- (c) errors -----------------------------------------------------------------------------------------------
def test_layouts_that_do_not_divide_fail_with_one_clear_line():
    with pytest.raises(ValueError, match=r"model.heads=4 is not divisible by the tensor-parallel size 3; choose"):
        check_tensor_parallel(CFG, 3)
    with pytest.raises(ValueError, match=r"model.vocab_size=97 .* pad the vocabulary to model.vocab_size=98"):
        check_tensor_parallel(CFG.replace(vocab_size=97), 2)
    with pytest.raises(ValueError, match="model.heads=4"):
        shard_state_dict(full_model().state_dict(), 0, 3, CFG)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        shard_state_dict({}, 2, 2, CFG)
    layers = Layers()
    layers.tp_size = 3
    with pytest.raises(ValueError, match="heads=4 is not divisible by the tensor-parallel size 3"):
        VLMo(CFG, layers)
