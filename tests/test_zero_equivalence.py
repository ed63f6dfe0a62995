"""DeepSpeed ZeRO 0-3 on 2 gloo ranks give the same losses and final weights as one plain-torch process (fp32),
with the same AdamW groups, learning-rate schedule and gradient clipping, and the communication settings the trainer
derives (gradients reduced to their owners, ZeRO-3 keeping gathered parameters for the step)."""
import pytest
import torch

from distributed import close_in_norm, image_text_engine_step, run_ranks
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses
from vlmo_ds.train.optim import lr_at, param_groups

STEPS, BATCH, CLIP, PEAK_LR, WARMUP = 5, 8, 1.0, 2e-4, 2  # the published base lr
CFG = preset("tiny", drop_path_rate=0.0, vocab_size=64, patch_size=16)


def batches():
    """STEPS global batches; every row has exactly 3 MLM labels, so per-rank MLM means average to the global mean."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(5, CFG.vocab_size, (BATCH, CFG.max_text_len), generator=g)
        mask = (torch.arange(CFG.max_text_len)[None] < torch.randint(8, CFG.max_text_len, (BATCH, 1),
                                                                        generator=g)).long()
        ids = ids.masked_fill(mask == 0, 0)
        labels = torch.full_like(ids, -100)
        labels[:, 2:5] = ids[:, 2:5]
        out.append({"image": torch.randn(BATCH, 3, CFG.image_size, CFG.image_size, generator=g), "text_ids": ids,
                    "text_mask": mask, "mlm_ids": ids.masked_fill(labels != -100, 4), "mlm_labels": labels})
    return out


def model():
    torch.manual_seed(0)
    return VLMo(CFG)


def reference():
    net = model()
    opt = torch.optim.AdamW(param_groups(net, 0.01), lr=PEAK_LR, betas=(0.9, 0.98), eps=1e-8)
    losses = []
    for step, batch in enumerate(batches()):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, STEPS, PEAK_LR, WARMUP)
        out = image_text_losses(net, batch, LossWeights(), seed=step)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
        losses.append(out["loss"].item())
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}


def zero_rank(rank, world, stage):
    import deepspeed

    from vlmo_ds.config.zero_settings import with_zero_settings, zero_settings
    from vlmo_ds.train.engine import build_engine, set_lr
    ds = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
          "train_batch_size": BATCH, "gradient_clipping": CLIP, "zero_optimization": {"stage": stage},
          "steps_per_print": 10**9}
    ds = with_zero_settings(ds, zero_settings(CFG, stage, precision="fp32"))  # as deepspeed_config() runs it
    engine = build_engine(model(), ds, PEAK_LR, (0.9, 0.98), 1e-8, 0.01)
    losses = []
    for step, batch in enumerate(batches()):
        set_lr(engine, lr_at(step, STEPS, PEAK_LR, WARMUP))
        losses.append(image_text_engine_step(engine, batch, rank, world, step))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return losses, weights


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_equals_single_process(stage):
    ref_losses, ref_weights = reference()
    for losses, weights in run_ranks(zero_rank, 2, stage, use_deepspeed=True):
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for name, value in ref_weights.items():
            assert close_in_norm(weights[name], value), name
