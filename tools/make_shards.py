#!/usr/bin/env python
"""Make vlmo_ds WebDataset shards from public data sets in their official formats.

Sub-commands (each has --help):
  coco-karpathy       dataset_coco.json + the COCO image folder       -> OUT/{train,val,test}/    retrieval
  flickr30k-karpathy  dataset_flickr30k.json + the Flickr30K images   -> OUT/{train,val,test}/    retrieval
  vqa2                VQA v2 questions/annotations + COCO images      -> OUT/{train,val,test-dev,test}/ and
                                                                         OUT/answer_vocab.json
  nlvr2               NLVR2 JSON-lines files + image pairs            -> OUT/{train,dev,test1}/
  caption-tsv         CC3M / SBU style caption TSV + images on disk   -> OUT/ (image-text pre-training pairs)
  img2dataset         img2dataset webdataset output, read as is       -> its sizes.json only

Every split folder holds shard-000000.tar, ... and sizes.json. Missing images, image paths outside --images,
unreadable lines and records without captions or answers are skipped, counted and named: the summary prints at the
end and OUT/conversion_report.json lists every name (and every file the run wrote). An OUT that already holds data
is refused; --overwrite replaces what an earlier make_shards run wrote there and touches nothing else. Samples are written in a seeded random order (--keep-order keeps the
files' order). Sample layouts: see vlmo_ds/data/formats/.

  python tools/make_shards.py coco-karpathy --json karpathy/dataset_coco.json --images coco/ --out shards/coco
  python tools/make_shards.py vqa2 --root vqa/ --images coco/ --out shards/vqa2
  python tools/make_shards.py nlvr2 --data nlvr/nlvr2/data --images nlvr2_images/ --out shards/nlvr2
  python tools/make_shards.py caption-tsv --tsv Train_GCC-training.tsv --images cc3m/ \\
      --image-pattern '{index:08d}.jpg' --out shards/cc3m
  python tools/make_shards.py img2dataset shards/laion
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlmo_ds.data.formats import caption_tsv, karpathy, nlvr2, vqa2  # noqa: E402
from vlmo_ds.data.formats import img2dataset as img2dataset_format  # noqa: E402
from vlmo_ds.data.formats.convert import Record, WriteOptions, shuffled, write_split  # noqa: E402
from vlmo_ds.data.formats.out_folder import prepare_out  # noqa: E402
from vlmo_ds.data.formats.report import ConversionReport  # noqa: E402
from vlmo_ds.data.formats.shard_writer import DEFAULT_SHARD_SIZE  # noqa: E402
from vlmo_ds.data.formats.vqa_answers import DEFAULT_MIN_COUNT  # noqa: E402


def _bar(args: argparse.Namespace, total: int | None, desc: str, unit: str = "sample") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=args.quiet, file=sys.stderr)


def _write(args: argparse.Namespace, report: ConversionReport, split: str, records: Iterable[Record],
           total: int | None) -> None:
    """Write one split under OUT/split (or OUT itself for split "")."""
    with _bar(args, total, f"{report.format} {split or args.out.name}") as bar:
        options = WriteOptions(args.shard_size, args.shard_mb << 20, args.workers, bar.update)
        written = write_split(records, args.out / split, args.images, report.split(split or args.out.name), options)
    report.files += [path.relative_to(args.out).as_posix() for path in written]


def _write_all(args: argparse.Namespace, report: ConversionReport, split: str, records: list[Record]) -> None:
    """Write a split whose records are all in memory, in the seeded order (or theirs with --keep-order)."""
    _write(args, report, split, shuffled(records, args.shuffle_seed), len(records))


def _karpathy(args: argparse.Namespace, name: str) -> ConversionReport:
    report = ConversionReport(name, {"json": str(args.json), "images": str(args.images)})
    for split, records in karpathy.karpathy_records(args.json, args.images, report, args.restval).items():
        _write_all(args, report, split, records)
    return report


def _vqa2(args: argparse.Namespace) -> ConversionReport:
    splits = args.splits or vqa2.available_splits(args.root)
    if not splits:
        raise FileNotFoundError(f"no VQA v2 questions file in {args.root} (e.g. "
                                f"{vqa2.official_split_files(args.root, 'train').questions.name})")
    report = ConversionReport("vqa2", {"root": str(args.root), "images": str(args.images)})
    if args.vocab is not None:
        vocab, sources = vqa2.load_vocab(args.vocab), [str(args.vocab)]
    else:
        files = [vqa2.official_split_files(args.root, s).annotations for s in ("train", "val")]
        files = [f for f in files if f is not None and f.is_file()]
        if not files:
            raise FileNotFoundError(f"no VQA v2 annotation file in {args.root} to build the answer vocabulary "
                                    "from; pass --vocab answer_vocab.json from an earlier run")
        logging.info("building the answer vocabulary from %s", ", ".join(f.name for f in files))
        vocab, sources = vqa2.build_vocab(files, args.min_count), [f.name for f in files]
    args.out.mkdir(parents=True, exist_ok=True)
    min_count = args.min_count if args.vocab is None else None  # a reused table keeps its own, unknown here
    vqa2.save_vocab(args.out / vqa2.VOCAB_FILE, vocab, min_count, sources)
    report.files.append(vqa2.VOCAB_FILE)
    report.extra.update(vocab_size=len(vocab), min_count=min_count, vocab_sources=sources)
    for split in splits:
        files = vqa2.official_split_files(args.root, split)
        records = vqa2.vqa_records(files, args.images, vocab, report.split(split), args.count_raw_answers)
        _write_all(args, report, split, records)
    return report


def _nlvr2(args: argparse.Namespace) -> ConversionReport:
    splits = args.splits or nlvr2.available_splits(args.data)
    if not splits:
        raise FileNotFoundError(f"no NLVR2 file (train.json, dev.json, test1.json) in {args.data}")
    report = ConversionReport("nlvr2", {"data": str(args.data), "images": str(args.images)})
    for split in splits:
        records = nlvr2.nlvr2_records(args.data / f"{split}.json", args.images, report.split(split))
        _write_all(args, report, split, records)
    return report


def _caption_tsv(args: argparse.Namespace) -> ConversionReport:
    layout = caption_tsv.TsvLayout(args.caption_col, args.image_col, args.header, args.image_pattern)
    report = ConversionReport("caption-tsv", {"tsv": str(args.tsv), "images": str(args.images)})
    rows = caption_tsv.tsv_rows(args.tsv, layout, report.split(args.out.name))
    if args.shuffle_seed is not None:  # shuffle the small row tuples, then make records one by one
        rows = shuffled(list(rows), args.shuffle_seed)
    records = (caption_tsv.tsv_record(row, args.images, layout) for row in rows)
    _write(args, report, "", records, len(rows) if isinstance(rows, list) else None)
    return report


def _img2dataset(args: argparse.Namespace) -> ConversionReport:
    shards = len(list(args.folder.glob("*.tar")))
    with _bar(args, shards, f"img2dataset {args.folder.name}", unit="shard") as bar:
        report = img2dataset_format.write_img2dataset_sizes(args.folder, bar.update, args.dry_run)
    args.out = args.folder
    return report


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; refused if it holds data)")
    parser.add_argument("--overwrite", action="store_true",
                        help="an --out holding data: remove the files an earlier make_shards run there wrote (those "
                             "its conversion_report.json lists), then write; nothing else is touched")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="samples per shard (default %(default)s)")
    parser.add_argument("--shard-mb", type=int, default=1024, help="a shard also ends past this size (default "
                                                                   "%(default)s MiB)")
    parser.add_argument("--workers", type=int, default=4, help="threads reading images (default %(default)s)")
    parser.add_argument("--shuffle-seed", type=int, default=0, help="seed of the written sample order")
    parser.add_argument("--keep-order", dest="shuffle_seed", action="store_const", const=None,
                        help="write samples in the annotation files' order")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, module: object, help_text: str) -> argparse.ArgumentParser:
        doc = (module.__doc__ or "").strip()
        return sub.add_parser(name, help=help_text, description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    for name, label in (("coco-karpathy", "dataset_coco.json"), ("flickr30k-karpathy", "dataset_flickr30k.json")):
        p = add(name, karpathy, f"{label} + images -> retrieval shards")
        p.add_argument("--json", required=True, type=Path, help=f"Karpathy's {label}")
        p.add_argument("--images", required=True, type=Path, help="image folder (COCO: the one holding val2014/)")
        p.add_argument("--restval", choices=("train", "restval"), default="train",
                       help="merge Karpathy's restval into train (default) or write it as its own split")
        _common(p)
    p = add("vqa2", vqa2, "VQA v2 questions + annotations + COCO images -> VQA shards")
    p.add_argument("--root", required=True, type=Path, help="folder of the official v2_*.json files")
    p.add_argument("--images", required=True, type=Path, help="COCO folder holding train2014/ val2014/ test2015/")
    p.add_argument("--splits", nargs="+", choices=vqa2.VQA_SPLITS, help="default: every split found in --root")
    p.add_argument("--vocab", type=Path, help="reuse this answer_vocab.json instead of building one")
    p.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT,
                   help="vocabulary: answers given as the majority answer at least this often (default %(default)s)")
    p.add_argument("--count-raw-answers", action="store_true",
                   help="soft scores from unnormalised human answers, as the published table scripts")
    _common(p)
    p = add("nlvr2", nlvr2, "NLVR2 JSON lines + image pairs -> NLVR2 shards")
    p.add_argument("--data", required=True, type=Path, help="folder of train.json, dev.json, test1.json")
    p.add_argument("--images", required=True, type=Path, help="image root (train/<dir>/, dev/, test1/ inside)")
    p.add_argument("--splits", nargs="+", choices=nlvr2.NLVR2_SPLITS, help="default: every file found in --data")
    _common(p)
    p = add("caption-tsv", caption_tsv, "caption TSV + images on disk -> image-text shards")
    p.add_argument("--tsv", required=True, type=Path, help="the caption file")
    p.add_argument("--images", required=True, type=Path, help="folder the image column's paths are relative to")
    p.add_argument("--caption-col", default="0", help="caption column: 0-based index or header name (default 0)")
    p.add_argument("--image-col", default="1", help="image column: 0-based index or header name (default 1)")
    p.add_argument("--header", action="store_true", help="the first line names the columns")
    p.add_argument("--image-pattern", default="{value}",
                   help="image file name from {value}, {basename}, {index}, {line} (default %(default)s)")
    _common(p)
    p = add("img2dataset", img2dataset_format, "check img2dataset output, write its sizes.json")
    p.add_argument("folder", type=Path, help="img2dataset's --output_folder (webdataset format)")
    p.add_argument("--dry-run", action="store_true", help="check and report only; write no sizes.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    commands = {"coco-karpathy": lambda: _karpathy(args, "coco-karpathy"),
                "flickr30k-karpathy": lambda: _karpathy(args, "flickr30k-karpathy"),
                "vqa2": lambda: _vqa2(args), "nlvr2": lambda: _nlvr2(args),
                "caption-tsv": lambda: _caption_tsv(args), "img2dataset": lambda: _img2dataset(args)}
    try:
        if getattr(args, "workers", 1) < 1:
            raise ValueError(f"--workers {args.workers} must be at least 1")
        if args.command != "img2dataset":  # img2dataset only adds sizes.json beside another tool's shards
            removed = prepare_out(args.out, args.overwrite)
            if removed:
                logging.info("--overwrite: removed the %d files an earlier run wrote in %s", len(removed), args.out)
        with logging_redirect_tqdm():
            report = commands[args.command]()
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"make_shards {args.command}: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    skipped = f" ({report.num_problems} records skipped)" if report.num_problems else ""
    if getattr(args, "dry_run", False):
        print(f"dry run: nothing written{skipped}")
    else:
        print(f"report: {report.save(args.out)}{skipped}")
    written = sum(split.written for split in report.splits.values())
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main(None if len(sys.argv) > 1 else ["--help"]))
