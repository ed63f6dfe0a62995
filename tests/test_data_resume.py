"""Exact resume: a loader state taken after k consumed batches, through JSON, gives the uninterrupted next batches."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from vlmo_ds.data.pipelines import image_text_loader
from shard_fixtures import WordTokenizer, image_bytes, write_shards

TOK = WordTokenizer()


def noisy_transform(image, rng: np.random.Generator) -> torch.Tensor:
    """A random flip and a random brightness offset, so a wrong Generator state shows in the pixels."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if rng.random() < 0.5:
        pixels = pixels.flip(-1)
    return pixels + float(rng.random())


def draw_hook(batch: dict, rng: np.random.Generator) -> dict:
    """Stands in for masking: one random draw per row, after collation."""
    return {**batch, "draw": torch.from_numpy(rng.random(batch["text_ids"].shape[0]))}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """31 samples in shards of uneven sizes (so slots run out at different times)."""
    folder = tmp_path_factory.mktemp("resume_shards")
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"{i:04d}", "png": image_bytes(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)),
                "txt": f"sample {i} with words"} for i in range(31)]
    for n, (first, size) in enumerate([(0, 3), (3, 9), (12, 5), (17, 7), (24, 7)]):
        write_shards(folder / f"part{n}", samples[first:first + size], per_shard=size, sizes=False)
    return [str(p) for p in sorted(folder.glob("part*/*.tar"))]


def make(shards, **kw):
    options = dict(batch_size=3, text_len=6, open_shards=2, seed=7, batch_hook=draw_hook)
    options.update(kw)
    return image_text_loader(shards, TOK, noisy_transform, **options)


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for name in a:
            same = torch.equal(a[name], b[name]) if isinstance(a[name], torch.Tensor) else a[name] == b[name]
            assert same, name


def resumed(shards, k: int, n: int, **kw) -> tuple[list[dict], list[dict]]:
    """(next n batches of a loader resumed after k, the same batches from an uninterrupted loader)."""
    first = make(shards, **kw)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches"] == k
    second = make(shards, **kw)
    second.load_state_dict(state)
    return take(second, n), take(make(shards, **kw), k + n)[k:]


@pytest.mark.parametrize("num_workers,dp_size", [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)])
def test_resume_is_exact(shards, num_workers, dp_size):
    seen = []
    for dp_rank in range(dp_size):
        got, want = resumed(shards, 5, 4, num_workers=num_workers, dp_rank=dp_rank, dp_size=dp_size)
        assert_same(got, want)
        seen.append({key for batch in want for key in batch["key"]})
    if dp_size == 2:
        assert not seen[0] & seen[1]  # the two data-parallel ranks read disjoint shards


def test_streams_not_workers_fix_the_order(shards):
    """Two logical streams give the same batches with 2 workers or none, and a state moves between them."""
    with_workers = take(make(shards, num_workers=2), 6)
    assert_same(take(make(shards, num_workers=0, num_streams=2), 6), with_workers)
    got, want = resumed(shards, 3, 3, num_workers=0, num_streams=2)
    assert_same(got, with_workers[3:])
    state = make(shards, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="num_streams=2"):
        make(shards, num_workers=1).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epochs_continue_the_stream_and_resume_mid_epoch(shards, num_workers):
    """3 batches per epoch: with 2 workers, epochs start on either worker (the stream order carries over)."""
    endless = take(make(shards, num_workers=num_workers), 6)
    loader = make(shards, batches_per_epoch=3, num_workers=num_workers)
    assert len(loader) == 3
    assert_same(list(loader) + list(loader), endless)
    assert loader.epoch == 2
    partial = make(shards, batches_per_epoch=3, num_workers=num_workers)
    take(partial, 1)
    state = json.loads(json.dumps(partial.state_dict()))
    again = make(shards, batches_per_epoch=3, num_workers=num_workers)
    again.load_state_dict(state)
    rest_of_epoch = list(again)
    assert len(rest_of_epoch) == 2 and again.epoch == 1
    assert_same(rest_of_epoch + list(again), endless[1:6])
