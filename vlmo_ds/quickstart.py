"""The quick start: `python -m vlmo_ds.quickstart` shows on a laptop CPU, in minutes, that vlmo_ds really learns.

1. writes the synthetic data set (drawn scenes with compositional captions) to data/synthetic, unless it is there;
2. trains a sentencepiece tokenizer on its captions and documents, unless data/synthetic/tok.model exists;
3. pre-trains the `tiny` recipe stage by stage through the same DeepSpeed trainer as the cluster recipes, in this
   one process: masked image modelling on images alone, MLM on text alone with attention and image experts frozen
   (then held-out text MLM accuracy beside the unigram baseline), and image-text pairs (ITC + ITM with hard
   negatives + MLM), then zero-shot retrieval on the held-out split;
4. fine-tunes the pre-trained model on each synthetic task (retrieval with ITM re-ranking, VQA, NLVR2) and
   evaluates it on the task's held-out split;
5. prints one table of every metric beside its chance or majority baseline.
--ablation then also trains the image-text stage alone, from scratch, for the pre-training's total steps, and
prints both runs' zero-shot retrieval side by side. Extra key=value arguments override the recipe (e.g.
stages.image_text.steps=100 for a shorter run).
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
FINETUNE = "tiny_finetune"
SPLITS_OF_KIND = {  # (training split, held-out split) of the synthetic data set
    "image_mim": ("images", None), "text_mlm": ("text", None), "image_text": ("pretrain_pairs", None),
    "retrieval": ("retrieval_train", "retrieval_test"), "vqa": ("vqa_train", "vqa_val"),
    "nlvr2": ("nlvr2_train", "nlvr2_dev"),
}


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


def recipe_overrides(recipe: str, root: Path, init_from: Path | None = None) -> list[str]:
    """Point the recipe's data, tokenizer and evaluation sets at `root` (each stage at its kind's split), and every
    stage's start at `init_from` when given (the fine-tuning stages at the pre-trained weights)."""
    stages = load_config(recipe).stages
    overrides = [f"tokenizer={root / 'tok.model'}", f"eval.retrieval={root / 'retrieval_test'}", "train.resume=none"]
    if any(stage.kind == "text_mlm" for stage in stages):
        overrides.append(f"eval.text_mlm={root / 'text_heldout'}")
    for stage in stages:
        train_split, held_out = SPLITS_OF_KIND[stage.kind]
        overrides.append(f"stages.{stage.name}.data={root / train_split}")
        if held_out:
            overrides.append(f"stages.{stage.name}.eval_data={root / held_out}")
        if init_from is not None:
            overrides.append(f"stages.{stage.name}.init_from={init_from}")
    return overrides


def pretrained_weights(cfg: RunConfig) -> Path:
    """The final weights of the pre-training run `cfg` (its last stage's record)."""
    from vlmo_ds.train.stage_record import WEIGHTS_FILE, stage_dir  # imports torch: not before the cheap checks

    return stage_dir(cfg.run_dir, cfg.stages[-1].name) / WEIGHTS_FILE


def image_text_only(cfg: RunConfig) -> RunConfig:
    """The ablation's baseline: the recipe's image-text stage alone, from scratch, for the pre-training's total
    steps."""
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
    p.add_argument("overrides", nargs="*", help=f"key=value overrides of the {RECIPE} (pre-training) recipe")
    p.add_argument("--finetune", action="append", default=[], metavar="KEY=VALUE",
                   help=f"an override of the {FINETUNE} recipe (repeat it: --finetune stages.vqa.steps=500 ...)")
    p.add_argument("--data", default=str(DATA), help=f"where the synthetic data set goes (default {DATA})")
    p.add_argument("--ablation", action="store_true",
                   help="then train on image-text pairs alone for as many steps and compare retrieval")
    return p.parse_intermixed_args(argv)  # options may come between the overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.data)
    try:
        cfg = load_config(RECIPE, recipe_overrides(RECIPE, root) + args.overrides)
        tasks = load_config(FINETUNE, recipe_overrides(FINETUNE, root, pretrained_weights(cfg)) + args.finetune)
    except ConfigError as err:
        print(f"vlmo_ds.quickstart: {err}", file=sys.stderr)
        return 2
    prepare_data(root)
    check_files(cfg)
    from vlmo_ds.eval.tables import summary_table  # heavy imports after the cheap checks
    from vlmo_ds.parallel.launch import discover, init_distributed
    from vlmo_ds.train.trainer import train

    env = discover()
    init_distributed(env)
    result = train(cfg, env)
    check_files(tasks)  # the pre-trained weights exist now
    tuned = train(tasks, env)
    minutes = (time.time() - started) / 60
    print(f"\nvlmo_ds quick start: {RECIPE} pre-training ({', '.join(s.name for s in cfg.stages)}, {result.step} "
          f"steps), {FINETUNE} ({', '.join(s.name for s in tasks.stages)}, {tuned.step} steps), "
          f"{minutes:.1f} minutes in all")
    print(summary_table({**result.stages, **tuned.stages}))
    print(f"run folders: {cfg.run_dir}, {tasks.run_dir} (TensorBoard: tensorboard --logdir_spec "
          f"pretrain:{cfg.run_dir}/tb,finetune:{tasks.run_dir}/tb)")
    if args.ablation:
        baseline = image_text_only(cfg)
        alone = train(baseline, env)
        zero_shot = next(o.retrieval for o in result.stages.values() if o.retrieval)
        print(f"\nablation, {baseline.stages[0].steps} pre-training steps each: stagewise ({cfg.run_dir}) vs "
              f"image-text only ({baseline.run_dir})")
        print(side_by_side({"stagewise": zero_shot, "image-text only": alone.eval}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
