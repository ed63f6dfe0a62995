"""Compiled MoME blocks (parallel.compile_blocks, vlmo_ds.parallel.compile): in place, names unchanged, the same
losses and gradients as eager blocks on tiny, alone and under activation checkpointing; refused where blocks hold
collectives. (Compiling needs a C++ compiler on CPU; the first compile takes a minute or more on 2 cores.)"""
import pytest
import torch

from vlmo_ds.config import ConfigError, load_config
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import text_mlm_losses
from vlmo_ds.parallel.checkpointing import set_activation_checkpointing
from vlmo_ds.parallel.compile import compile_blocks

CFG = preset("tiny", drop_path_rate=0.0, vocab_size=64, max_text_len=16)


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, CFG.vocab_size, (4, CFG.max_text_len), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 3:7] = ids[:, 3:7]
    return {"mlm_ids": ids.masked_fill(labels != -100, 4), "mlm_labels": labels, "text_mask": torch.ones_like(ids)}


def loss_and_grads(checkpointed: bool, compiled: bool) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = VLMo(CFG).train()
    names = [n for n, _ in model.named_parameters()]
    if checkpointed:
        set_activation_checkpointing(model, 1)
    if compiled:
        assert compile_blocks(model) == CFG.depth
        assert [n for n, _ in model.named_parameters()] == names  # in place: optimizer groups, checkpoints agree
    out = text_mlm_losses(model, batch())
    out["loss"].backward()
    return out["loss"].item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_blocks_give_the_eager_losses_and_gradients(checkpointed):
    loss, grads = loss_and_grads(checkpointed=False, compiled=False)
    compiled_loss, compiled_grads = loss_and_grads(checkpointed, compiled=True)
    assert compiled_loss == pytest.approx(loss, rel=1e-5)
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("override", ["parallel.zero_stage=3", "parallel.tensor=2"])
def test_refused_where_blocks_hold_collectives(override):
    with pytest.raises(ConfigError, match=r"^parallel.compile_blocks: .*set parallel.compile_blocks=false"):
        load_config("tiny_image_text", ["parallel.compile_blocks=true", override, "model.vocab_size=1024"],
                    world_size=2)
    assert load_config("tiny_image_text", ["parallel.compile_blocks=true"]).parallel.compile_blocks
