#!/usr/bin/env python
"""Make vlmo_ds's synthetic shapes data set as WebDataset shards.

64 px scenes of one to four coloured shapes (12 colours, two sizes, six shapes) on textured grey backgrounds, with
compositional captions that state colours, sizes, counts, places (top / middle / bottom), the vertical order of two
objects and sets of colours, never the shapes themselves (too small to learn quickly on a CPU): "a big green object
near the top", "there are two large white objects", "a blue object below a cyan object", "four shapes yellow cyan
lime and red". Half of the compositions are held out of every training split, so retrieval_test holds only captions
never seen in training. Every split the VLMo recipes use is written, byte-identical for a seed:

  pretrain_pairs/   KEY.jpg KEY.txt KEY.json {"caption", "scene"}           image-text pre-training
  retrieval_train/  KEY.jpg KEY.txt KEY.json {"captions", "image_id", ...}  retrieval fine-tuning
  retrieval_test/   the same, one image per held-out composition             retrieval evaluation
  images/           KEY.jpg                                                  masked image modelling
  text/             KEY.txt (a paragraph of scene sentences)                 masked language modelling
  text_heldout/     KEY.txt of held-out compositions only                    text MLM evaluation
  vqa_train/ vqa_val/     KEY.jpg KEY.json {"question_id", "image_id", "question", "answers" (10), "answer_type"}
  nlvr2_train/ nlvr2_dev/ KEY.left.jpg KEY.right.jpg KEY.json {"identifier", "sentence", "label"}

Each split folder holds shard-000000.tar, ... and sizes.json; manifest.json at the top records the seed, version,
counts and config and is written last. Captions never say left or right, so they stay true under a horizontal flip.

  python tools/make_synthetic.py --out data/synthetic               # the default set (66k samples, ~20 s on 2 cores)
  python tools/make_synthetic.py --out /tmp/syn --scale 0.05 --seed 1
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlmo_ds.data.synthetic import SPLITS, SyntheticConfig, is_current, read_manifest, write_synthetic  # noqa: E402


def make_synthetic(
    out: str | os.PathLike,
    config: SyntheticConfig = SyntheticConfig(),
    *,
    workers: int = 1,
    force: bool = False,
    show_progress: bool = True,
) -> dict:
    """Writes the data set under out (skipped when out already holds this exact config, unless force) -> manifest."""
    if not force and is_current(out, config):
        logging.getLogger(__name__).info("synthetic data set in %s is up to date (--force rewrites it)", out)
        return read_manifest(out)
    total = sum(config.sizes.values())
    with logging_redirect_tqdm(), tqdm(total=total, unit="sample", desc="synthetic", disable=not show_progress) as bar:
        return write_synthetic(out, config, workers=workers, progress=bar.update)


def _parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; e.g. data/synthetic)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every split size by this (0.05: a test set)")
    workers = min(2, os.cpu_count() or 1)
    parser.add_argument("--workers", type=int, default=workers, help="processes (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="rewrite even if --out already holds this exact data set")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    groups = {
        "sizes": parser.add_argument_group("samples per split (0 leaves a split out)"),
        "other": parser.add_argument_group("content and format"),
    }
    for field in fields(SyntheticConfig):
        group = groups["sizes" if field.name in SPLITS else "other"]
        group.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            default=field.default,
            metavar="N" if field.name in SPLITS else None,
            help=f"{field.metadata['help']} (default %(default)s)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    values = {f.name: getattr(args, f.name) for f in fields(SyntheticConfig)}
    try:
        config = SyntheticConfig(**values)
        if args.scale != 1.0:
            config = config.scaled(args.scale)
        progress = not args.quiet
        manifest = make_synthetic(args.out, config, workers=args.workers, force=args.force, show_progress=progress)
    except ValueError as error:
        print(f"make_synthetic: {error}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    print(f"synthetic data set in {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
