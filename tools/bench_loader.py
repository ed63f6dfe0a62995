#!/usr/bin/env python
"""Loader benchmark: image-text pairs per second per CPU core, made the way the training loader makes them, beside
the rate per GPU the capacity planner predicts a recipe's training step consumes.

What is measured is the image-text StreamLoader of a pre-training stage, end to end: tar shards read, JPEG decode,
random resized crop + flip + RandAugment (2 ops, magnitude 9) at each image size, normalisation, WordPiece
tokenisation, collation, MLM masking. Each DataLoader worker is one single-threaded process (one core), so
pairs/s per core = pairs/s / workers; keep --workers below the machine's free cores (the training process and this
tool's main process take one). The first batch (worker start-up) is not timed.

Shards: --shards DIR reads existing image-text shards (img2dataset layout); without it the tool first writes
--samples realistic pairs with the project's shard writer into a temporary folder: 500x375 RGB JPEGs at quality 90
(about 50 KB each, the size of a typical web image) with captions of 8-16 words. The tokenizer is --tokenizer (a
BERT vocab.txt or sentencepiece model, as recipes name it), else a WordPiece vocabulary made from the captions.

The planner's side: the best layout vlmo_ds.plan finds for --recipe on --gpus GPUs of kind --gpu, its samples/s
per GPU, and the cores per GPU that rate needs at the measured per-core rate of the recipe's image size.

    python tools/bench_loader.py                                   # 300 pairs, 224 and 384 px, 1 worker
    python tools/bench_loader.py --shards data/cc3m/train --tokenizer data/bert-base-uncased/vocab.txt --workers 4
    python tools/bench_loader.py --recipe large --gpus 64 --gpu h100-80gb --json loader.json
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlmo_ds.data.formats.shard_writer import ShardWriter  # noqa: E402
from vlmo_ds.data.hooks import TextMasking  # noqa: E402
from vlmo_ds.data.pipelines import image_text_loader  # noqa: E402
from vlmo_ds.data.tokenizer import load_tokenizer  # noqa: E402
from vlmo_ds.data.transforms import build_image_transform  # noqa: E402
from vlmo_ds.data.wordpiece import SPECIAL_TOKENS  # noqa: E402

WORDS = {
    "adj": "red old small wooden bright busy quiet white large modern rusty colourful empty snowy green".split(),
    "noun": "dog woman bicycle train house boat child tree market bridge car table window street horse".split(),
    "verb": "standing sitting walking parked waiting resting running leaning".split(),
    "prep": "near beside behind under across along".split(),
    "place": "the city the park a small village the harbour the mountains a sunny afternoon the evening".split(" "),
}
TEMPLATES = ("a {adj} {noun} {verb} {prep} the {adj} {noun} in {place} .",
             "{adj} {noun} and a {adj} {noun} {prep} a {noun} , {place}",
             "photo of a {noun} {verb} {prep} an {adj} {noun} on {place}")


def caption(rng: np.random.Generator) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    words = template.split()
    return " ".join(str(rng.choice(WORDS[w[1:-1]])) if w.startswith("{") else w for w in words)


def photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    """A JPEG with the statistics of a photo: smooth regions, edges and grain (~50 KB at 500x375, quality 90)."""
    broad = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                     Image.Resampling.BICUBIC)
    detail = Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR)
    pixels = 0.75 * np.asarray(broad, np.float32) + 0.25 * np.asarray(detail, np.float32)
    pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_pairs(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with ShardWriter(folder, shard_size=100) as writer:
        for i in range(count):
            writer.write(f"{i:08d}", {"jpg": photo(rng), "txt": caption(rng).encode(),
                                      "json": json.dumps({"key": f"{i:08d}"}).encode()})


def caption_vocab(path: Path) -> Path:
    """A WordPiece vocab.txt of the special tokens, the caption words, punctuation and single-letter pieces."""
    words = sorted({w for ws in WORDS.values() for phrase in ws for w in phrase.split()} | {"a", "an", "the", "of",
                   "and", "on", "in", "photo"})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    path.write_text("\n".join([*SPECIAL_TOKENS, ".", ",", *words, *letters, *(f"##{c}" for c in letters)]) + "\n")
    return path


def measure(shards: str, tokenizer, size: int, batch: int, workers: int, seconds: float, text_len: int) -> dict:
    loader = image_text_loader(shards, tokenizer, build_image_transform(size, train=True), batch_size=batch,
                               text_len=text_len, batch_hook=TextMasking.for_tokenizer(tokenizer),
                               num_workers=workers, seed=size)
    batches = iter(loader)
    next(batches)  # workers start, shards open: not part of the steady rate
    pairs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pairs += next(batches)["image"].shape[0]
    elapsed = time.perf_counter() - start
    del batches
    rate = pairs / elapsed
    return {"size": size, "pairs": pairs, "seconds": elapsed, "pairs_per_s": rate,
            "pairs_per_s_per_core": rate / max(1, workers), "ms_per_pair_per_core": 1e3 * max(1, workers) / rate}


def planner_need(recipe: str, gpus: int, gpu: str) -> dict:
    from vlmo_ds.plan import plan, recipe_step

    best = next((e for e in plan(recipe, gpus=gpus, gpu=gpu) if e.fits), None)
    if best is None:
        raise SystemExit(f"the planner finds no layout of {recipe} that fits {gpus} x {gpu}; pick more GPUs or "
                         "another --gpu")
    return {"recipe": recipe, "gpu": gpu, "gpus": gpus, "layout": best.layout.describe(), "mfu": best.mfu,
            "image_size": recipe_step(recipe).model.image_size, "pairs_per_s_per_gpu": best.samples_per_second / gpus}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="existing image-text shards (folder or brace pattern); default: write them")
    parser.add_argument("--samples", type=int, default=300, help="pairs to write when --shards is not given")
    parser.add_argument("--tokenizer", help="vocab.txt or sentencepiece model; default: a vocabulary of the captions")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384], help="image sizes to measure")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (one core each)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per batch")
    parser.add_argument("--text-len", type=int, default=40, help="text length in tokens (the published 40)")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per image size")
    parser.add_argument("--recipe", default="large", help="recipe whose planned step rate is shown beside")
    parser.add_argument("--gpus", type=int, default=64, help="GPUs the planner lays the recipe out on")
    parser.add_argument("--gpu", default="h100-80gb", help="GPU kind for the planner (vlmo_ds.plan.GPUS)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1: the measured loader runs in worker processes, one core each")
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            shards = str(Path(tmp) / "pairs")
            write_pairs(Path(shards), args.samples)
            print(f"wrote {args.samples} pairs (500x375 JPEG q90 + caption) to {shards}")
        tokenizer = load_tokenizer(args.tokenizer or caption_vocab(Path(tmp) / "vocab.txt"))
        rows = [measure(shards, tokenizer, size, args.batch, args.workers, args.seconds, args.text_len)
                for size in args.sizes]
    print(f"loader: decode + crop + flip + RandAugment + normalise + tokenise + mask, batch {args.batch}, "
          f"{args.workers} worker(s)")
    print(f"{'size':>6} {'pairs/s':>9} {'pairs/s/core':>13} {'ms/pair/core':>13}")
    for row in rows:
        print(f"{row['size']:>6} {row['pairs_per_s']:>9.1f} {row['pairs_per_s_per_core']:>13.1f} "
              f"{row['ms_per_pair_per_core']:>13.2f}")
    need = planner_need(args.recipe, args.gpus, args.gpu)
    per_core = {row["size"]: row["pairs_per_s_per_core"] for row in rows}
    line = (f"planner: {need['recipe']} on {need['gpus']} x {need['gpu']} ({need['layout']}, MFU {need['mfu']:.0%}) "
            f"needs {need['pairs_per_s_per_gpu']:.0f} pairs/s per GPU at {need['image_size']} px")
    if need["image_size"] in per_core:
        need["cores_per_gpu"] = need["pairs_per_s_per_gpu"] / per_core[need["image_size"]]
        line += f", i.e. {need['cores_per_gpu']:.2f} cores per GPU"
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"loader": rows, "planner": need, "workers": args.workers,
                                               "batch": args.batch}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
