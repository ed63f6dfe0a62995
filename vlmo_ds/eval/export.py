"""Image and text embeddings of a retrieval set, written in shards with their ids, for building a search index.

The embeddings are the dual encoder's L2-normalised ITC features (the ones retrieval ranks by: cosine similarity is
their dot product). Layout under the output folder:

    manifest.json                 written last, by rank 0: format, model config, dims, counts and the shard lists
    image-000000.safetensors ...  "embeddings" [n, D] (float32 or float16) and "rows" [n] int64 (the global row);
                                  metadata "ids" (JSON list: each image's image_id, or its key when it has none)
    text-000000.safetensors ...   the same for captions; metadata "ids" (caption number), "image_ids" (the image
                                  each caption belongs to) and "captions" (the caption strings)
Shard s holds rows [s * shard_rows, (s + 1) * shard_rows) of the set in the set's order, and rank r of W writes the
shards s with s % W == r, so the files do not depend on the number of ranks. Every rank makes the same number of
model calls (vlmo_ds.eval.sharded). ``read_embeddings`` reads a kind back in row order.
Shapes: n rows, D feature size.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vlmo_ds.data.shards import ShardSource
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.eval.retrieval import encode_features
from vlmo_ds.eval.retrieval_set import RetrievalInputs, load_retrieval_set
from vlmo_ds.eval.sharded import evaluating, model_dtype, progress

FORMAT = "vlmo_ds.embeddings/1"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _shard_rows(count: int, shard_rows: int, rank: int, world_size: int) -> list[range]:
    """The row ranges of the shards this rank writes."""
    shards = math.ceil(count / shard_rows)
    return [range(s * shard_rows, min(count, (s + 1) * shard_rows)) for s in range(rank, shards, world_size)]


def _round_calls(count: int, shard_rows: int, world_size: int, batch_size: int, index: int) -> int:
    """Model calls every rank makes for its index-th shard: enough for the rank whose shard is the largest (ranks
    call in lockstep, the images of a round first, then its captions, as ZeRO-3's collective gathers need)."""
    sizes = [len(shards[index]) for r in range(world_size)
             if index < len(shards := _shard_rows(count, shard_rows, r, world_size))]
    return max((math.ceil(n / batch_size) for n in sizes), default=0)


def _write(path: Path, embeddings: torch.Tensor, rows: range, metadata: dict[str, Any]) -> str:
    tmp = path.with_name(path.name + ".tmp")
    tensors = {"embeddings": embeddings.contiguous(), "rows": torch.arange(rows.start, rows.stop)}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}})
    os.replace(tmp, path)
    return path.name


def export_embeddings(model: nn.Module, shards: ShardSource, tokenizer: Tokenizer, out_dir: str | os.PathLike,
                      image_size: int, text_len: int, batch_size: int = 64, shard_rows: int = 10_000,
                      dtype: str = "float32", rank: int = 0, world_size: int = 1,
                      group: dist.ProcessGroup | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Write the set's image and text embeddings under ``out_dir`` (see the module docstring); returns the manifest.

    ``rank``/``world_size`` are the data-parallel ones; every rank must call it.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if shard_rows < 1 or batch_size < 1:
        raise ValueError(f"shard_rows={shard_rows} and batch_size={batch_size} must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_retrieval_set(shards)
    inputs = RetrievalInputs(data, tokenizer, image_size, text_len, torch.device(device), model_dtype(model))
    num_images, num_texts = len(data.images), len(data.captions)
    image_shards = _shard_rows(num_images, shard_rows, rank, world_size)
    text_shards = _shard_rows(num_texts, shard_rows, rank, world_size)
    rounds = max(math.ceil(num_images / shard_rows), math.ceil(num_texts / shard_rows))
    bar = progress(sum(map(len, image_shards + text_shards)), "embeddings", rank)
    try:
        with evaluating(model):
            for index in range(math.ceil(rounds / world_size)):
                images = image_shards[index] if index < len(image_shards) else range(0)
                texts = text_shards[index] if index < len(text_shards) else range(0)
                calls = (_round_calls(num_images, shard_rows, world_size, batch_size, index),
                         _round_calls(num_texts, shard_rows, world_size, batch_size, index))
                feats = encode_features(model, inputs, images, texts, calls, batch_size, bar)
                _write_pair(out, feats, images, texts, data, shard_rows, DTYPES[dtype])
    finally:
        bar.close()
    if world_size > 1:
        dist.barrier(group=group)
    cfg = getattr(model, "module", model).cfg
    manifest = {"format": FORMAT, "dtype": dtype, "normalized": True, "shard_rows": shard_rows,
                "model_config": dataclasses.asdict(cfg),
                "image": {"count": num_images, "dim": cfg.dim, "shards": _names("image", num_images, shard_rows)},
                "text": {"count": num_texts, "dim": cfg.dim, "shards": _names("text", num_texts, shard_rows)},
                "skipped_samples": sum(data.skipped.values())}
    if rank == 0:
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out / MANIFEST)
    return manifest


def _names(kind: str, count: int, shard_rows: int) -> list[str]:
    return [f"{kind}-{s:06d}.safetensors" for s in range(math.ceil(count / shard_rows))]


def _write_pair(out: Path, feats: tuple[torch.Tensor, torch.Tensor], images: range, texts: range, data,
                shard_rows: int, dtype: torch.dtype) -> None:
    image_feats, text_feats = feats
    if len(images):
        ids = [data.images[i].image_id for i in images]
        _write(out / f"image-{images.start // shard_rows:06d}.safetensors", image_feats.cpu().to(dtype), images,
               {"kind": "image", "ids": ids})
    if len(texts):
        owners = data.text_to_image[texts.start:texts.stop].tolist()
        _write(out / f"text-{texts.start // shard_rows:06d}.safetensors", text_feats.cpu().to(dtype), texts,
               {"kind": "text", "ids": list(texts), "image_ids": [data.images[o].image_id for o in owners],
                "captions": data.captions[texts.start:texts.stop]})


def read_embeddings(out_dir: str | os.PathLike, kind: str) -> tuple[list[Any], torch.Tensor, dict[str, list]]:
    """(ids, embeddings [n, D], other metadata lists) of one kind ("image" or "text"), in row order."""
    out = Path(out_dir)
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {out}: the export did not finish (or this is not an export)")
    manifest = json.loads(manifest_path.read_text())
    if kind not in ("image", "text"):
        raise ValueError(f"kind={kind!r}: choose image or text")
    ids: list[Any] = []
    extra: dict[str, list] = {}
    parts = []
    for name in manifest[kind]["shards"]:
        with safe_open(str(out / name), framework="pt") as handle:
            meta = handle.metadata()
            parts.append(handle.get_tensor("embeddings"))
        ids += json.loads(meta["ids"])
        for field in meta:
            if field not in ("format", "kind", "ids"):
                extra.setdefault(field, []).extend(json.loads(meta[field]))
    embeddings = torch.cat(parts) if parts else torch.zeros(0, manifest[kind]["dim"])
    return ids, embeddings, extra
