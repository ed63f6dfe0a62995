"""Train a vlmo_ds sentencepiece tokenizer from text files and/or WebDataset shards.

Inputs may be mixed freely:
  plain text files       one sentence (caption) per line, e.g. corpus.txt
  a WebDataset shard     shards/000000.tar: every ``.txt`` member is read, one sentence per line
  a folder of shards     shards/: every *.tar in it, sorted
  a brace pattern        "shards/{000000..000099}.tar" (quote it so the shell leaves the braces alone)

The model reserves [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4 and lower-cases text (nmt_nfkc_cf normalisation).
On a small corpus the vocabulary comes out smaller than --vocab-size (a soft limit); the real size is printed and is
what the model's vocab_size must be set to (vlmo_ds reads it from the tokenizer).

Example:
  python tools/train_tokenizer.py "data/cc3m/{000000..000331}.tar" --vocab-size 32000 --out tok/cc3m_32k
  -> tok/cc3m_32k.model and tok/cc3m_32k.vocab
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlmo_ds.data.text_corpus import expand_inputs, iter_lines  # noqa: E402
from vlmo_ds.data.tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: E402

__all__ = ["main"]

logger = logging.getLogger("train_tokenizer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="text files, .tar shards, folders of shards or brace patterns")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="largest vocabulary, special pieces included (default 32000; a small corpus gives fewer)")
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram",
                        help="sentencepiece algorithm (default unigram)")
    parser.add_argument("--max-sentences", type=int, default=None,
                        help="use at most this many non-empty lines (default: all; sentencepiece holds them in memory)")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of characters the vocabulary must cover; rarer ones become [UNK] (default 0.9995)")
    parser.add_argument("--byte-fallback", action="store_true",
                        help="spell unknown characters as UTF-8 bytes instead of [UNK] (adds 256 pieces)")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1, help="training threads (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the trainer (default 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = expand_inputs(args.inputs)
    # sentencepiece pulls lines from the iterator while it loads them, so the bar tracks reading.
    with tqdm(iter_lines(files), desc=f"reading {len(files)} file(s)", unit=" lines") as lines:
        model_path = train_sentencepiece(
            lines,
            args.out,
            args.vocab_size,
            model_type=args.model_type,
            max_sentences=args.max_sentences,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            seed=args.seed,
            num_threads=args.num_threads,
        )
    tok = SentencePieceTokenizer(model_path)
    logger.info("wrote %s: vocab_size %d (asked for at most %d)", model_path, tok.vocab_size, args.vocab_size)
    return model_path


if __name__ == "__main__":
    main()
