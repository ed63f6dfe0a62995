"""ITM negatives fetched by all_to_all of the chosen rows (vlmo_ds.objectives.negatives): on 2 and 3 gloo ranks every
rank gets exactly the rows direct indexing of the whole global batch gives, with duplicates, rows of its own and
ranks it wants nothing from; it moves at most the bytes of the negatives it uses (counted by the traffic counter),
does one host synchronisation per exchange, and tools/bench.py's layout mode prints the exchange beside its formula."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from vlmo_ds.objectives.negatives import exchange_negatives
from vlmo_ds.parallel.traffic import count_collectives

B, T = 3, 5
BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


def global_batch(world: int) -> dict:
    g = torch.Generator().manual_seed(world)
    ids = torch.randint(5, 90, (world * B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (world * B, 1), generator=g)).long()
    return {"image": torch.randn(world * B, 3, 4, 4, generator=g), "text_ids": ids, "text_mask": mask}


def choices(world: int) -> torch.Tensor:
    """[world, 2, B] global indices: rank 0 wants two copies of one row, its own rows and none of rank 1's images."""
    g = torch.Generator().manual_seed(10 + world)
    drawn = torch.randint(0, world * B, (world, 2, B), generator=g)
    drawn[0, 0] = torch.tensor([world * B - 1, world * B - 1, 0])
    return drawn


def rank_fn(rank, world):
    batch = {k: v[rank * B : (rank + 1) * B] for k, v in global_batch(world).items()}
    neg_image, neg_text = choices(world)[rank]
    syncs = []
    real_tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        syncs.append(tuple(tensor.shape))
        return real_tolist(tensor)

    torch.Tensor.tolist = counted_tolist
    try:
        with count_collectives({"data": None}) as counter:
            full = exchange_negatives(neg_image, neg_text, batch["image"], batch["text_ids"], batch["text_mask"],
                                      dist.group.WORLD)
        masks_only = exchange_negatives(neg_image, neg_text, None, None, batch["text_mask"], dist.group.WORLD)
    finally:
        torch.Tensor.tolist = real_tolist
    sent = counter.total(("all_to_all",), group="data")
    return {"full": full, "masks_only": masks_only, "syncs": syncs[:1] + [len(syncs)],
            "sent_bytes": sent.payload, "calls": sent.calls}


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_equals_indexing_the_global_batch(world):
    ranks = run_ranks(rank_fn, world)
    batch, drawn = global_batch(world), choices(world)
    used = B * (3 * 4 * 4 * 4 + T * 8 + T * 8)  # the negative images, ids and masks a rank uses
    for rank, got in enumerate(ranks):
        neg_image, neg_text = drawn[rank]
        images, ids, mask = got["full"]
        assert torch.equal(images, batch["image"][neg_image])
        assert torch.equal(ids, batch["text_ids"][neg_text]) and torch.equal(mask, batch["text_mask"][neg_text])
        assert mask.dtype == batch["text_mask"].dtype
        assert got["masks_only"][:2] == (None, None) and torch.equal(got["masks_only"][2], mask)
        assert got["syncs"] == [(world, world, 2), 2]  # one copy of the split sizes per exchange
        assert got["calls"] == 2  # images, then ids and masks packed
    # every row is sent once per request: over all ranks, the bytes of the negatives used, so 1x per rank on average
    assert sum(r["sent_bytes"] for r in ranks) == world * used


def test_one_process_indexes_its_own_batch():
    batch = global_batch(1)
    neg_image, neg_text = torch.tensor([2, 0, 1]), torch.tensor([1, 1, 0])
    images, ids, mask = exchange_negatives(neg_image, neg_text, batch["image"], batch["text_ids"],
                                           batch["text_mask"])
    assert torch.equal(images, batch["image"][neg_image]) and torch.equal(ids, batch["text_ids"][neg_text])
    assert torch.equal(mask, batch["text_mask"][neg_text])


@pytest.mark.slow
def test_bench_prints_the_exchange_beside_its_formula(tmp_path):
    out = tmp_path / "traffic.json"
    run = subprocess.run([sys.executable, str(BENCH), "--ranks", "2", "--preset", "tiny", "--batch", "2", "--steps",
                          "1", "--zero-stage", "1", "--json", str(out)], capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ITM image exchange" in run.stdout
    row = json.loads(out.read_text())["itm_exchange"]
    image, text = 3 * 64 * 64 * 4, 32 * 8 * 2  # tiny: 64 px images, fp32; 32 int64 ids and mask values
    assert row["minimum"] == 2 * (image + text)
    assert 0 < row["counted"] <= 2 * row["minimum"] and row["calls"] == 2
