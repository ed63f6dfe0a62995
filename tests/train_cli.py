"""Small synthetic data and the command line of a short tiny-model training run, shared by the CLI tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from vlmo_ds.data.synthetic import SyntheticConfig, write_synthetic
from vlmo_ds.data.text_corpus import expand_inputs, iter_lines
from vlmo_ds.data.tokenizer import train_sentencepiece
from vlmo_ds.train.metrics import read_metrics

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def make_data(root: Path) -> Path:
    """1% of the synthetic set (shards of 40) and a BPE tokenizer on its captions."""
    write_synthetic(root, SyntheticConfig(shard_size=40).scaled(0.01))
    train_sentencepiece(iter_lines(expand_inputs([str(root / "pretrain_pairs")])), root / "tok", vocab_size=120,
                        model_type="bpe")
    return root


def recipe_args(data: Path, run_dir: Path, steps: int, batch: int = 4, *extra: str) -> list[str]:
    """Arguments after `python -m vlmo_ds.train`: the tiny_image_text recipe, shrunk to seconds."""
    return ["tiny_image_text", f"run_dir={run_dir}", f"tokenizer={data / 'tok.model'}", f"stages.0.data={data / 'pretrain_pairs'}",
            "eval.retrieval=null", f"stages.0.steps={steps}", f"train.micro_batch={batch}",
            f"train.global_batch={batch}", "train.ckpt_every=2", "train.keep_last=2", "train.num_workers=1",
            "train.record_samples=true", "model.patch_size=16", "model.max_text_len=16", *extra]


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlmo_ds.train", *args]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}
