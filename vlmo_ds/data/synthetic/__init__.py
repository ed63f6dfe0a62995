"""The synthetic shapes data set: procedurally drawn, deterministic scenes with captions, questions and statements.

vlmo_ds ships it so that the quick start and the tests run with no download: small images of coloured shapes with
captions of their colours, sizes, counts and places (image-text pairs, retrieval with held-out compositions), image-only and text-only sets, VQA
questions and NLVR2 statements, written as WebDataset shards. `write_synthetic(out_dir, SyntheticConfig(...))` makes
it; `tools/make_synthetic.py` is the command line.
"""

from vlmo_ds.data.synthetic.config import SPLITS, VERSION, SyntheticConfig
from vlmo_ds.data.synthetic.writer import ensure_synthetic, is_current, read_manifest, write_synthetic

__all__ = ["SPLITS", "VERSION", "SyntheticConfig", "ensure_synthetic", "is_current", "read_manifest", "write_synthetic"]
