"""The quick start: `python -m vlmo_ds.quickstart` shows on a laptop CPU, in minutes, that vlmo_ds really learns.

1. writes the synthetic data set (drawn scenes with compositional captions) to data/synthetic, unless it is there;
2. trains a sentencepiece tokenizer on its captions and documents, unless data/synthetic/tok.model exists;
3. pre-trains the `tiny` recipe stage by stage through the same DeepSpeed trainer as the cluster recipes, in this
   one process: masked image modelling on images alone, MLM on text alone with attention and image experts frozen
   (then held-out text MLM accuracy beside the unigram baseline), and image-text pairs (ITC + ITM with hard
   negatives + MLM);
4. evaluates zero-shot retrieval on the held-out split and prints TR@1/5/10 and IR@1/5/10 beside the chance level.
--ablation then also trains the image-text stage alone, from scratch, for the same total steps, and prints both
runs' retrieval side by side (about twice the quick start's time). Extra key=value arguments override the recipe
(e.g. stages.image_text.steps=100 for a shorter run).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vlmo_ds.config import ConfigError, RunConfig, check_files, load_config
from vlmo_ds.data.synthetic import SyntheticConfig, ensure_synthetic, is_current
from vlmo_ds.data.text_corpus import expand_inputs, iter_lines
from vlmo_ds.data.tokenizer import train_sentencepiece

DATA = Path("data/synthetic")
RECIPE = "tiny"
SPLIT_OF_KIND = {"image_mim": "images", "text_mlm": "text", "image_text": "pretrain_pairs"}


def prepare_data(root: Path) -> Path:
    """The synthetic data set and its tokenizer; returns the tokenizer path."""
    config = SyntheticConfig()
    tokenizer = root / "tok.model"
    if not is_current(root, config):
        tokenizer.unlink(missing_ok=True)  # a tokenizer of an older data set version would not fit the new captions
    with tqdm(total=sum(config.sizes.values()), desc="synthetic data", unit=" samples") as bar:
        ensure_synthetic(root, config, workers=2, progress=bar.update)
    if not tokenizer.is_file():
        files = expand_inputs([str(root / "pretrain_pairs"), str(root / "text")])
        # BPE keeps each of the few dozen caption words whole (unigram splits most into letters on so small a corpus)
        train_sentencepiece(tqdm(iter_lines(files), desc="tokenizer corpus", unit=" lines"), root / "tok",
                            vocab_size=200, model_type="bpe")
    return tokenizer


def recipe_overrides(recipe: str, root: Path) -> list[str]:
    """Point the recipe's data, tokenizer and evaluation sets at `root` (each stage at its kind's split)."""
    stages = load_config(recipe).stages
    overrides = [f"tokenizer={root / 'tok.model'}", f"eval.retrieval={root / 'retrieval_test'}", "train.resume=none"]
    if any(stage.kind == "text_mlm" for stage in stages):
        overrides.append(f"eval.text_mlm={root / 'text_heldout'}")
    for stage in stages:
        overrides.append(f"stages.{stage.name}.data={root / SPLIT_OF_KIND[stage.kind]}")
    return overrides


def image_text_only(cfg: RunConfig) -> RunConfig:
    """The ablation's baseline: the recipe's image-text stage alone, from scratch, for the recipe's total steps."""
    stage = next(s for s in cfg.stages if s.kind == "image_text")
    total = sum(s.steps for s in cfg.stages)
    return dataclasses.replace(cfg, run_dir=f"{cfg.run_dir}_image_text_only",
                               stages=(dataclasses.replace(stage, steps=total),))


def side_by_side(runs: dict[str, dict]) -> str:
    """Retrieval of several runs, one column per run: TR/IR at 1, 5, 10 in percent."""
    names = list(runs)
    lines = ["recall %".ljust(10) + "".join(n.rjust(22) for n in names)]
    for prefix in ("tr", "ir"):
        for k in (1, 5, 10):
            lines.append(f"{prefix.upper()}@{k}".ljust(10) + "".join(f"{100 * runs[n][f'{prefix}@{k}']:22.2f}"
                                                                    for n in names))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlmo_ds.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help=f"key=value overrides of the {RECIPE} recipe")
    p.add_argument("--data", default=str(DATA), help=f"where the synthetic data set goes (default {DATA})")
    p.add_argument("--ablation", action="store_true",
                   help="then train on image-text pairs alone for as many steps and compare retrieval")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.data)
    try:
        cfg = load_config(RECIPE, recipe_overrides(RECIPE, root) + args.overrides)
    except ConfigError as err:
        print(f"vlmo_ds.quickstart: {err}", file=sys.stderr)
        return 2
    prepare_data(root)
    check_files(cfg)
    from vlmo_ds.eval.metrics import format_table  # heavy imports after the cheap checks
    from vlmo_ds.parallel.launch import discover, init_distributed
    from vlmo_ds.train.trainer import train

    env = discover()
    init_distributed(env)
    result = train(cfg, env)
    minutes = (time.time() - started) / 60
    print(f"\nvlmo_ds quick start: {RECIPE} recipe, stages {', '.join(s.name for s in cfg.stages)}, "
          f"{result.step} steps, {minutes:.1f} minutes in all")
    for outcome in result.stages.values():
        if outcome.text_mlm:
            print(f"held-out text MLM accuracy {100 * outcome.text_mlm['accuracy']:.2f}% "
                  f"(unigram baseline {100 * outcome.text_mlm['unigram']:.2f}%)")
    print(format_table(result.eval))
    print(f"run folder: {cfg.run_dir} (TensorBoard: tensorboard --logdir {cfg.run_dir}/tb)")
    if args.ablation:
        baseline = image_text_only(cfg)
        alone = train(baseline, env)
        print(f"\nablation, {result.step} steps each: stagewise ({cfg.run_dir}) vs image-text only "
              f"({baseline.run_dir})")
        print(side_by_side({"stagewise": result.eval, "image-text only": alone.eval}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
