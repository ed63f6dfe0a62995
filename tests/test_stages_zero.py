"""Frozen parameters under DeepSpeed ZeRO 0-3 (one gloo rank): no optimizer state, bit-identical after training
steps; the consolidated stage weights are the module's in fp32, the optimizer's float32 masters in bf16."""
import pytest
import torch

from distributed import run_ranks
from vlmo_ds.config.schema import STAGE2_TRAINABLE
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import text_mlm_losses
from vlmo_ds.train.freeze import apply_trainable

CFG = preset("tiny", vocab_size=64, patch_size=16, max_text_len=16, drop_path_rate=0.0)


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(5, CFG.vocab_size, (4, CFG.max_text_len), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 3:7] = ids[:, 3:7]
    return {"mlm_ids": ids.masked_fill(labels != -100, 4), "mlm_labels": labels, "text_mask": torch.ones_like(ids)}


def frozen_stage_rank(rank, world, zero, bf16):
    import deepspeed

    from vlmo_ds.train.engine import build_engine
    from vlmo_ds.train.stage_record import full_state_dict

    torch.manual_seed(0)
    model = VLMo(CFG)
    apply_trainable(model, STAGE2_TRAINABLE)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    numel = {n: p.numel() for n, p in model.named_parameters()}  # before ZeRO 3 partitions them
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": zero}, "steps_per_print": 10**9,
          "bf16": {"enabled": bf16}}
    engine = build_engine(model, ds, 1e-3, (0.9, 0.98), 1e-8, 0.1)  # strong decay: drift would show
    for step in range(3):
        b = {k: v.to(torch.bfloat16) if v.is_floating_point() and bf16 else v for k, v in batch(step).items()}
        out = engine(lambda m, b: text_mlm_losses(m, b), b)
        engine.backward(out["loss"])
        engine.step()
    state = full_state_dict(engine)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=zero == 3):
        after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    optimizer = engine.optimizer
    if zero == 0:
        names = {id(p): n for n, p in engine.module.named_parameters()}
        if bf16:  # DeepSpeed's unfused optimizer: module (bf16) parameters in fp16_groups, masters in the torch AdamW
            optimized = {names[id(p)] for group in optimizer.fp16_groups for p in group}
        else:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            optimized = {names[i] for i in owned | {id(p) for p in optimizer.state}}
        partition = None
    else:
        optimized = None
        flats = optimizer.single_partition_of_fp32_groups if zero < 3 else optimizer.fp32_partitioned_groups_flat
        partition = sum(t.numel() for t in flats)
    return {"trainable": trainable, "before": before, "after": after, "state": state, "optimized": optimized,
            "partition": partition, "numel": numel}


@pytest.mark.slow
@pytest.mark.parametrize("zero, bf16", [(0, False), (1, False), (2, False), (3, False), (0, True), (2, True)])
def test_frozen_parameters_stay_frozen_under_zero(zero, bf16):
    (got,) = run_ranks(frozen_stage_rank, 1, zero, bf16, use_deepspeed=True)
    trainable, before, after, state = got["trainable"], got["before"], got["after"], got["state"]
    frozen = set(before) - trainable
    assert "transformer.blocks.0.attn.qkv.weight" in frozen and "transformer.blocks.0.mlp_imag.fc1.weight" in frozen
    low = torch.bfloat16 if bf16 else torch.float32
    for name in frozen:  # no gradient, no update, no weight decay drift
        assert torch.equal(after[name], before[name].to(low)), name
        assert torch.equal(state[name], after[name].float()), name
    text = "transformer.blocks.0.mlp_text.fc1.weight"
    assert not torch.equal(after[text], before[text].to(low))
    for name in trainable:
        assert state[name].dtype == torch.float32
        if bf16:  # the float32 master, which the bf16 module weight only rounds
            assert torch.equal(state[name].to(torch.bfloat16), after[name]), name
        else:
            assert torch.equal(state[name], after[name]), name
    if bf16:
        assert not torch.equal(state[text], after[text].float())
    trainable_numel = sum(got["numel"][n] for n in trainable)
    if zero == 0:
        assert got["optimized"] == trainable
    else:  # the fp32 partition holds the trainable parameters only (plus alignment padding)
        assert trainable_numel <= got["partition"] < trainable_numel + 1024
