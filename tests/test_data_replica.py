"""A tensor-parallel replica decodes each sample once: its rank 0 reads, the other rank receives the same batches."""
from __future__ import annotations

import os
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

import vlmo_ds.data.pipelines as pipelines
from distributed import run_ranks
from shard_fixtures import WordTokenizer, image_bytes, plain_transform, write_shards
from vlmo_ds.data.errors import DataSourceError
from vlmo_ds.data.hooks import TextMasking
from vlmo_ds.data.replica import ReplicaLoader, replica_loader
from vlmo_ds.data.workers import default_num_workers

TOK = WordTokenizer()
WORKERS = dict(num_workers=0, local_world_size=2)  # decodes in the process, where they are counted


def noisy_transform(image, rng: np.random.Generator) -> torch.Tensor:
    """Draws from the stream's generator, so equal batches on both ranks mean the same stream, not luck."""
    pixels = plain_transform(image, rng)
    return pixels + torch.from_numpy(rng.standard_normal(pixels.shape).astype(np.float32))


def make_loader(folder, batches_per_epoch=None, num_workers=0, **options):
    return pipelines.image_text_loader(folder, TOK, noisy_transform, batch_size=4, text_len=6, num_workers=num_workers,
                                       seed=3, open_shards=2, batch_hook=TextMasking.for_tokenizer(TOK),
                                       batches_per_epoch=batches_per_epoch, **options)


def take(batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


def replica_rank(rank: int, world: int, folder: str, bad: str) -> dict:
    """One rank of a TP=2 replica: 3 batches, a checkpoint, 2 more; a resumed loader from that checkpoint; an
    epoch-long loader. Decodes are counted by wrapping the pipelines' image decoder."""
    decodes = []
    decode_image = pipelines.decode_image
    pipelines.decode_image = lambda *args: decodes.append(1) or decode_image(*args)
    group = dist.new_group([0, 1])
    cpu = torch.device("cpu")
    loader = replica_loader(partial(make_loader, folder), group, cpu, **WORKERS)
    batches = iter(loader)
    first = take(batches, 3)
    state = loader.state_dict()
    rest = take(batches, 2)
    resumed = replica_loader(partial(make_loader, folder), group, cpu, **WORKERS)
    resumed.load_state_dict(state)
    again = take(iter(resumed), 2)
    epoch = list(replica_loader(partial(make_loader, folder, 2), group, cpu, **WORKERS))
    decoded = len(decodes)
    try:  # every sample bad: the reading rank's loader gives up, and the receiving rank hears why
        next(iter(replica_loader(partial(make_loader, bad, max_consecutive_skips=3), group, cpu, **WORKERS)))
    except DataSourceError as err:
        failed = str(err)
    return {"failed": failed, "batches": first + rest, "again": again, "state": state, "epoch": epoch,
            "decodes": decoded, "reads": isinstance(loader, ReplicaLoader) and loader.loader is not None,
            "skipped": loader.skipped}


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert sorted(a) == sorted(b)
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def test_a_tensor_parallel_replica_decodes_each_sample_once(tmp_path):
    samples = [{"__key__": f"{i:04d}", "png": image_bytes(np.full((4, 6, 3), i, np.uint8)), "txt": f"photo {i} of"
                f" a thing{i % 3}", "json": {"id": i}} for i in range(13)]
    write_shards(tmp_path, samples, per_shard=4)
    write_shards(tmp_path / "bad", [{"__key__": f"{i:04d}", "png": b"not an image", "txt": "x"} for i in range(4)],
                 per_shard=4)
    reader, receiver = run_ranks(replica_rank, 2, str(tmp_path), str(tmp_path / "bad"))
    assert reader["reads"] and not receiver["reads"]
    # every decode on the reading rank; + 1 for each of its 3 loaders: the source check's first sample (source_check)
    assert reader["decodes"] == (3 + 2 + 2 + 2) * 4 + 3 and receiver["decodes"] == 0
    for key in ("batches", "again", "epoch"):
        assert_same_batches(receiver[key], reader[key])
    assert receiver["state"] == reader["state"] and receiver["skipped"] == reader["skipped"] == {}
    assert_same_batches(reader["again"], reader["batches"][3:])  # either rank's saved state resumes exactly
    assert len(reader["epoch"]) == 2  # a finite loader's end reaches the receiving rank too
    assert "held no usable sample" in reader["failed"]
    assert receiver["failed"] == reader["failed"]  # the same one line on every rank of the replica
    # the replica sees exactly the batches one process's loader gives: broadcasting changes nothing
    alone = iter(make_loader(tmp_path))
    assert_same_batches(reader["batches"], take(alone, 5))
    assert reader["batches"][0]["word_start"].dtype == torch.bool and len(reader["batches"][0]["meta"]) == 4


def test_workers_follow_the_cores_of_each_gpu(monkeypatch):
    """16 cores for 4 local ranks: 3 workers each (a core kept for the training process); a rank reading for 2
    ranks of its replica on this node gets their cores too; an srun task bound to its own 16 cores keeps them."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")
    assert default_num_workers(4) == 3 and default_num_workers(4, ranks_served=2) == 7
    assert default_num_workers(4, slurm_tasks=True) == 15 and default_num_workers(32) == 1
