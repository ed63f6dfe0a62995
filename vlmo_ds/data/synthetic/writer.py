"""Writing the synthetic data set as WebDataset shards, byte-identical for a seed.

Layout under the output folder:

    manifest.json                   seed, version, config, samples and shards per split, compositions, vocabulary
    <split>/shard-000000.tar ...    KEY.jpg, KEY.txt, KEY.json, KEY.left.jpg ... grouped by KEY (img2dataset layout)
    <split>/sizes.json              {"shard-000000.tar": n, ...}

Tar members carry fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644) so that the bytes depend on the
content only. Each shard is written under a temporary name and renamed when complete, and manifest.json is written
last: a folder with a manifest is a complete data set.
"""

from __future__ import annotations

import json
import logging
import contextlib
import multiprocessing
import multiprocessing.pool
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vlmo_ds.data.formats.shard_writer import add_member, shard_name, write_json_atomic
from vlmo_ds.data.synthetic.captions import caption_vocabulary
from vlmo_ds.data.synthetic.config import VERSION, SyntheticConfig
from vlmo_ds.data.synthetic.scene import FAMILIES
from vlmo_ds.data.synthetic.splits import Plan, Sample, make_sample

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIZES = "sizes.json"
_CHUNK = 64  # samples per task handed to a worker process


def _write_shard(path: Path, samples: list[Sample]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                add_member(tar, f"{key}.{ext}", members[ext])
    os.replace(tmp, path)


_worker_plan: Plan | None = None


def _init_worker(config: SyntheticConfig) -> None:
    global _worker_plan
    _worker_plan = Plan.build(config)


def _worker_sample(task: tuple[str, int]) -> Sample:
    return make_sample(_worker_plan, *task)


def _samples(plan: Plan, split: str, n: int, pool: multiprocessing.pool.Pool | None) -> Iterator[Sample]:
    if pool is None:
        return (make_sample(plan, split, i) for i in range(n))
    return pool.imap(_worker_sample, ((split, i) for i in range(n)), chunksize=_CHUNK)


def _write_split(
    folder: Path, samples: Iterator[Sample], n: int, shard_size: int, progress: Callable[[int], None]
) -> int:
    """Writes n samples into shards of shard_size under folder; returns the number of shards."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("shard-*.tar"), folder / SIZES]:  # a smaller rewrite must not leave old shards behind
        stale.unlink(missing_ok=True)
    sizes, batch = {}, []
    for sample in samples:
        batch.append(sample)
        if len(batch) == shard_size or len(sizes) * shard_size + len(batch) == n:
            name = shard_name(len(sizes))
            _write_shard(folder / name, batch)
            sizes[name] = len(batch)
            progress(len(batch))
            batch = []
    write_json_atomic(folder / SIZES, sizes)
    return len(sizes)


def _manifest(config: SyntheticConfig, plan: Plan, shards: dict[str, int]) -> dict:
    return {
        "name": "vlmo_ds synthetic shapes",
        "version": VERSION,
        "seed": config.seed,
        "image_size": config.image_size,
        "counts": {split: n for split, n in config.sizes.items() if n},
        "shards": shards,
        "compositions": {
            "total": sum(len(plan.train[f]) + len(plan.held_out[f]) for f in FAMILIES),
            "train": {f: len(plan.train[f]) for f in FAMILIES},
            "held_out": {f: len(plan.held_out[f]) for f in FAMILIES},
        },
        "caption_vocabulary": caption_vocabulary(),
        "config": config.to_json(),
    }


def write_synthetic(
    out_dir: str | os.PathLike,
    config: SyntheticConfig = SyntheticConfig(),
    *,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Writes every non-empty split of the data set under out_dir and returns the manifest.

    workers > 1 makes samples in that many processes; the bytes are the same for any number of workers.
    progress, if given, is called with the number of samples just written (for a progress bar).
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest is written
    plan = Plan.build(config)
    report = progress or (lambda n: None)
    shards = {}
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:
            # spawn, not fork: the caller may be a training process with threads (torch), which fork can deadlock
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(context.Pool(workers, _init_worker, (config,)))
        for split, n in config.sizes.items():
            if n:
                samples = _samples(plan, split, n, pool)
                shards[split] = _write_split(out / split, samples, n, config.shard_size, report)
                logger.info("synthetic %s: %d samples in %d shards", split, n, shards[split])
    manifest = _manifest(config, plan, shards)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a complete synthetic data set under out_dir, or None when there is none."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def is_current(out_dir: str | os.PathLike, config: SyntheticConfig) -> bool:
    """Whether out_dir holds a complete data set made by this version of the generator with exactly this config."""
    manifest = read_manifest(out_dir)
    return manifest is not None and manifest.get("version") == VERSION and manifest.get("config") == config.to_json()


def ensure_synthetic(
    out_dir: str | os.PathLike,
    config: SyntheticConfig = SyntheticConfig(),
    *,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Returns the manifest of out_dir if it already holds this config's data set; otherwise writes it first."""
    if is_current(out_dir, config):
        logger.info("synthetic data set in %s is up to date", out_dir)
        return read_manifest(out_dir)
    return write_synthetic(out_dir, config, workers=workers, progress=progress)

