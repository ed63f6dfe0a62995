"""ITC and ITM on 2 data-parallel ranks equal the single-process run on the concatenated batch, gradients too."""
import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.itc import contrastive_loss
from vlmo_ds.objectives.itm import sample_hard_negatives
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses

SEED, N, WORLD = 11, 8, 2
WEIGHTS = LossWeights(itc=1.0, itm=1.0, mlm=0.0)


def build():
    torch.manual_seed(0)
    return VLMo(preset("tiny", drop_path_rate=0.0))


def global_batch():
    g = torch.Generator().manual_seed(3)
    cfg = preset("tiny")
    ids = torch.randint(5, cfg.vocab_size, (N, cfg.max_text_len), generator=g)
    mask = (torch.arange(cfg.max_text_len)[None] < torch.randint(6, cfg.max_text_len, (N, 1), generator=g)).long()
    image = torch.randn(N, 3, cfg.image_size, cfg.image_size, generator=g)
    return {"image": image, "text_ids": ids.masked_fill(mask == 0, 0), "text_mask": mask}


def negatives(model, batch, group, local_rows):
    with torch.no_grad():
        img, _ = model.itc_image(model.encode_image(batch["image"]))
        txt, _ = model.itc_text(model.encode_text(batch["text_ids"], batch["text_mask"]))
        itc = contrastive_loss(img, txt, model.logit_scale, group, local_rows)
        return [t.tolist() for t in sample_hard_negatives(itc, SEED, img.shape[0], group)]


def step(model, batch, group=None, local_rows=False):
    model.zero_grad()
    out = image_text_losses(model, batch, WEIGHTS, SEED, group, itc_local_rows=local_rows)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: out[k].item() for k in ("itc", "itm", "loss")}, grads


def rank_fn(rank, world):
    batch = {k: v.chunk(world)[rank] for k, v in global_batch().items()}
    results = {}
    for local_rows in (False, True):
        model = build()
        losses, grads = step(model, batch, dist.group.WORLD, local_rows)
        for g in grads.values():  # what data parallelism does
            dist.all_reduce(g)
            g /= world
        results[local_rows] = (losses, grads, negatives(model, batch, dist.group.WORLD, local_rows))
    return results


@pytest.mark.slow
def test_two_ranks_equal_one_process():
    model = build()
    ref_losses, ref_grads = step(model, global_batch())
    ref_neg = negatives(model, global_batch(), None, False)
    ranks = run_ranks(rank_fn, WORLD)
    b = N // WORLD
    for local_rows in (False, True):
        for key in ("itc", "itm"):
            mean = sum(r[local_rows][0][key] for r in ranks) / WORLD
            assert mean == pytest.approx(ref_losses[key], rel=1e-5), (local_rows, key)
        if not local_rows:  # every rank computes the global ITC loss
            assert all(r[False][0]["itc"] == pytest.approx(ref_losses["itc"], rel=1e-5) for r in ranks)
        for rank, r in enumerate(ranks):
            neg_image, neg_text = r[local_rows][2]
            assert neg_image == ref_neg[0][rank * b : (rank + 1) * b]
            assert neg_text == ref_neg[1][rank * b : (rank + 1) * b]
            grads = r[local_rows][1]
            assert set(grads) == set(ref_grads)
            for name, g in grads.items():
                scale = ref_grads[name].abs().max().clamp_min(1e-8)
                assert ((g - ref_grads[name]).abs().max() / scale).item() < 1e-5, (local_rows, name)
    assert ref_neg[0] != list(range(N)) and all(ref_neg[0][i] != i for i in range(N))
