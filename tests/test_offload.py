"""The CPU-offload config (ds_configs/zero3_offload_bf16.json) starts: the engine builds DeepSpeed's CPU Adam for it
(DeepSpeed refuses a torch optimizer with an offloaded optimizer), and two fp32 steps of the tiny model on 2 gloo
ranks under ZeRO-3 with parameters and optimizer state in CPU memory give the losses and weights of one plain-torch
process. The first run compiles the CPU Adam op (about a minute on 2 cores; cached in ~/.cache/torch_extensions)."""
import pytest
import torch

from distributed import image_text_engine_step, run_ranks
from vlmo_ds.config.ds_json import DS_CONFIGS
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses
from vlmo_ds.train.engine import offloads_optimizer
from vlmo_ds.train.optim import param_groups

CFG = preset("tiny", drop_path_rate=0.0, vocab_size=64, patch_size=16)
STEPS, BATCH, LR = 2, 4, 1e-4


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(5, CFG.vocab_size, (BATCH, CFG.max_text_len), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2:5] = ids[:, 2:5]  # as many labels in every row: per-rank means average to the global mean
    return {"image": torch.randn(BATCH, 3, CFG.image_size, CFG.image_size, generator=g), "text_ids": ids,
            "text_mask": torch.ones_like(ids), "mlm_ids": ids.masked_fill(labels != -100, 4), "mlm_labels": labels}


def model() -> VLMo:
    torch.manual_seed(0)
    return VLMo(CFG)


def offload_config(world: int) -> dict:
    from vlmo_ds.config import deepspeed_config, load_config

    cfg = load_config("tiny_image_text", [f"deepspeed={DS_CONFIGS / 'zero3_offload_bf16.json'}", "precision=fp32",
                                          "parallel.zero_stage=3", f"train.micro_batch={BATCH // world}",
                                          f"train.global_batch={BATCH}", "optim.grad_clip=1.0"], world_size=world)
    return deepspeed_config(cfg, dp_size=world)


def offload_rank(rank, world):
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from vlmo_ds.train.engine import build_engine

    engine = build_engine(model(), offload_config(world), LR, (0.9, 0.98), 1e-8, 0.01)
    losses = []
    for step in range(STEPS):
        losses.append(image_text_engine_step(engine, batch(step), rank, world, step))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return losses, weights, isinstance(engine.optimizer.optimizer, DeepSpeedCPUAdam)


def reference():
    net = model()
    opt = torch.optim.AdamW(param_groups(net, 0.01), lr=LR, betas=(0.9, 0.98), eps=1e-8)
    losses = []
    for step in range(STEPS):
        out = image_text_losses(net, batch(step), LossWeights(), seed=step)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(out["loss"].item())
    return losses, net.state_dict()


def test_the_offload_config_offloads_the_optimizer():
    assert offloads_optimizer(offload_config(1))
    assert not offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}})


@pytest.mark.slow
def test_zero3_with_cpu_adam_trains_like_one_process():
    ref_losses, ref_weights = reference()
    for losses, weights, cpu_adam in run_ranks(offload_rank, 2, use_deepspeed=True):
        assert cpu_adam
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        # within 5 % of the two steps' update: the ranks sum gradients in another order, and Adam's normalised step
        # turns last-bit differences of gradients near eps into visible ones (CPU Adam alone matches torch's AdamW
        # to the last bit of the weights)
        for name, value in ref_weights.items():
            assert torch.allclose(weights[name], value, rtol=0, atol=0.05 * LR * STEPS), name
