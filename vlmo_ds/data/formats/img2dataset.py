"""img2dataset output, read as it is: a check of its shards and the sizes.json that lets the loaders report its size.

img2dataset's ``--output_format webdataset`` writes 00000.tar, 00001.tar, ... of ``KEY.jpg`` + ``KEY.txt`` (the
caption) + ``KEY.json`` (url, caption, width, height, status, ...) per downloaded image, with 00000_stats.json
(count, successes, failed_to_download, failed_to_resize, ...) and 00000.parquet beside each shard. vlmo_ds's
image-text loader reads those shards directly (vlmo_ds.data.pipelines.ImageTextPipeline); nothing is converted.

``index_img2dataset`` reads every shard's tar headers (the data is skipped by seeking, so a 10k-sample shard costs
milliseconds), counts its samples the way the loaders group members, and reports samples without an image or a
caption (the loader will skip them) and shards that are not readable tar files (left out of sizes.json, so the
loaders call the data set's size unknown until the shard is fixed or removed).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

from vlmo_ds.data.decode import IMAGE_EXTS
from vlmo_ds.data.formats.report import ConversionReport, SplitReport
from vlmo_ds.data.formats.shard_writer import write_json_atomic
from vlmo_ds.data.shards import SIZES_FILE

_STATS_FIELDS = ("count", "successes", "failed_to_download", "failed_to_resize")


def _shard_members(path: Path) -> dict[str, set[str]]:
    """key -> member extensions of one shard, from its headers; tarfile.TarError/OSError/EOFError if unreadable."""
    samples: dict[str, set[str]] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isreg() or (Path(info.name).name.startswith("__") and info.name.endswith("__")):
                continue
            key, ext = base_plus_ext(info.name)
            if key is not None:
                samples.setdefault(key, set()).add(ext.lower())
    return samples


def _stats_totals(folder: Path) -> dict[str, int]:
    """The download counts summed over img2dataset's *_stats.json files (empty when there are none)."""
    totals: dict[str, int] = {}
    for path in sorted(folder.glob("*_stats.json")):
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for name in _STATS_FIELDS:
            if isinstance(stats, dict) and isinstance(stats.get(name), int):
                totals[name] = totals.get(name, 0) + stats[name]
    return totals


def index_img2dataset(folder: str | os.PathLike, report: SplitReport,
                      progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Samples per readable shard of ``folder`` ({name: count}, all samples, usable or not); problems in ``report``
    (bad_shard, no_image, no_caption named "shard:key"); ``report.written`` counts the usable samples."""
    folder = Path(folder)
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no *.tar shards in {folder}; give the --output_folder img2dataset wrote")
    sizes = {}
    for path in shards:
        try:
            samples = _shard_members(path)
        except (tarfile.TarError, OSError, EOFError) as err:
            report.problem("bad_shard", f"{path.name} ({type(err).__name__}: {err})")
            continue
        finally:
            if progress is not None:
                progress(1)
        sizes[path.name] = len(samples)
        for key, exts in samples.items():
            if not any(ext in exts for ext in IMAGE_EXTS):
                report.problem("no_image", f"{path.name}:{key}")
            elif "txt" not in exts:
                report.problem("no_caption", f"{path.name}:{key}")
            else:
                report.written += 1
    report.shards = len(sizes)
    return sizes


def write_img2dataset_sizes(folder: str | os.PathLike, progress: Callable[[int], None] | None = None,
                            dry_run: bool = False) -> ConversionReport:
    """Index ``folder``, write its sizes.json (unless ``dry_run``) and return the report (not yet saved)."""
    folder = Path(folder)
    report = ConversionReport("img2dataset", {"folder": str(folder)})
    split = report.split(folder.name or str(folder))
    sizes = index_img2dataset(folder, split, progress)
    if not dry_run:
        write_json_atomic(folder / SIZES_FILE, sizes)
    totals: dict[str, Any] = _stats_totals(folder)
    if totals:
        report.extra["img2dataset_stats"] = totals
        if "successes" in totals and totals["successes"] != sum(sizes.values()):
            split.note("stats_mismatch", f"*_stats.json count {totals['successes']} successes, the shards hold "
                                         f"{sum(sizes.values())} samples")
    return report
