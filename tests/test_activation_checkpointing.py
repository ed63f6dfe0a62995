"""Activation checkpointing per block: the same losses and gradients as without it (drop path on, so the recomputed
forward must redraw the same masks), blocks really recomputed, names and keys untouched, and switching off restores
plain blocks. (Under tensor x pipeline parallelism it is exercised by tests/test_pipeline_parallel.py.)"""
import pytest
import torch

from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses
from vlmo_ds.parallel.checkpointing import set_activation_checkpointing

CFG = preset("tiny", dim=64, depth=4, heads=4, vlffn_start=2, image_size=32, patch_size=8, vocab_size=96,
             max_text_len=12, table_text_len=16, drop_path_rate=0.2)


def batch() -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, CFG.vocab_size, (4, CFG.max_text_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, 8:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 1:4]
    return {"image": torch.randn(4, 3, CFG.image_size, CFG.image_size, generator=g), "text_ids": ids,
            "text_mask": mask, "mlm_ids": ids.masked_fill(labels != -100, 4), "mlm_labels": labels}


def run(model: VLMo, every: int) -> tuple[dict, dict, list[int]]:
    """Losses, gradients and each block's attention calls (a recomputed block calls its attention again)."""
    chosen = set_activation_checkpointing(model, every)
    assert chosen == (list(range(0, CFG.depth, every)) if every else [])
    attention_calls = [0] * CFG.depth

    def counter(i: int):
        def count(*_):
            attention_calls[i] += 1
        return count

    handles = [b.attn.register_forward_pre_hook(counter(i)) for i, b in enumerate(model.transformer.blocks)]
    model.zero_grad()
    torch.manual_seed(7)  # drop path masks
    out = image_text_losses(model, batch(), LossWeights(), seed=3)
    out["loss"].backward()
    for handle in handles:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in out.items()}, grads, attention_calls


def test_checkpointed_blocks_give_the_same_losses_and_gradients():
    torch.manual_seed(0)
    model = VLMo(CFG).train()
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    plain_losses, plain_grads, plain_calls = run(model, 0)
    for every in (1, 2):
        losses, grads, calls = run(model, every)
        assert losses == pytest.approx(plain_losses, rel=1e-6)
        assert set(grads) == set(plain_grads)
        for name, grad in plain_grads.items():
            assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7), (every, name)
        # blocks below vlffn_start run 3 passes (image, text, fused), VL blocks 5 (+ the two VL-path copies);
        # a checkpointed block runs each of them once more during backward
        assert plain_calls == [3, 3, 5, 5]
        assert calls == [c * (2 if i % every == 0 else 1) for i, c in enumerate(plain_calls)]
        assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    assert run(model, 0)[2] == plain_calls
    assert all("forward" not in block.__dict__ for block in model.transformer.blocks)
    with pytest.raises(ValueError, match="every=-1 must be 0"):
        set_activation_checkpointing(model, -1)
