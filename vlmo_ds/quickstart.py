"""The quick start: `python -m vlmo_ds.quickstart` shows on a laptop CPU, in minutes, that vlmo_ds really learns.

1. writes the synthetic data set (drawn scenes with compositional captions) to data/synthetic, unless it is there;
2. trains a sentencepiece tokenizer on its captions and documents, unless data/synthetic/tok.model exists;
3. trains the `tiny` recipe on image-text pairs (ITC + ITM with hard negatives + MLM) through the same DeepSpeed
   trainer as the cluster recipes, in this one process;
4. evaluates zero-shot retrieval on the held-out split and prints TR@1/5/10 and IR@1/5/10 beside the chance level.
Extra key=value arguments override the recipe (e.g. stages.0.steps=100 for a shorter run).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vlmo_ds.config import ConfigError, check_files, load_config
from vlmo_ds.data.synthetic import SyntheticConfig, ensure_synthetic
from vlmo_ds.data.text_corpus import expand_inputs, iter_lines
from vlmo_ds.data.tokenizer import train_sentencepiece

DATA = Path("data/synthetic")


def prepare_data(root: Path) -> Path:
    """The synthetic data set and its tokenizer; returns the tokenizer path."""
    config = SyntheticConfig()
    with tqdm(total=sum(config.sizes.values()), desc="synthetic data", unit=" samples") as bar:
        ensure_synthetic(root, config, workers=2, progress=bar.update)
    tokenizer = root / "tok.model"
    if not tokenizer.is_file():
        files = expand_inputs([str(root / "pretrain_pairs"), str(root / "text")])
        # BPE keeps each of the few dozen caption words whole (unigram splits most into letters on so small a corpus)
        train_sentencepiece(tqdm(iter_lines(files), desc="tokenizer corpus", unit=" lines"), root / "tok",
                            vocab_size=200, model_type="bpe")
    return tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlmo_ds.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the tiny recipe")
    p.add_argument("--data", default=str(DATA), help=f"where the synthetic data set goes (default {DATA})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.data)
    try:
        overrides = [f"tokenizer={root / 'tok.model'}", f"stages.0.data={root / 'pretrain_pairs'}",
                     f"eval.retrieval={root / 'retrieval_test'}", "train.resume=none"] + args.overrides
        cfg = load_config("tiny", overrides)
    except ConfigError as err:
        print(f"vlmo_ds.quickstart: {err}", file=sys.stderr)
        return 2
    prepare_data(root)
    check_files(cfg)
    from vlmo_ds.parallel.launch import discover, init_distributed  # heavy imports after the cheap checks
    from vlmo_ds.train.trainer import train

    env = discover()
    init_distributed(env)
    result = train(cfg, env)
    from vlmo_ds.eval.metrics import format_table

    minutes = (time.time() - started) / 60
    print(f"\nvlmo_ds quick start: tiny model, {result.step} steps, {minutes:.1f} minutes in all")
    print(format_table(result.eval))
    print(f"run folder: {cfg.run_dir} (TensorBoard: tensorboard --logdir {cfg.run_dir}/tb)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
