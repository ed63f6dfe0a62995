"""Settings of the synthetic data set: seed, number of samples per split, image format, shard size."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vlmo_ds.data.synthetic.scene import family_sizes

VERSION = 6  # bump whenever the same config would produce different bytes
SPLITS: tuple[str, ...] = (
    "pretrain_pairs", "retrieval_train", "retrieval_test", "images", "text", "text_heldout",
    "vqa_train", "vqa_val", "nlvr2_train", "nlvr2_dev",
)  # fmt: skip  (each is also a size field of SyntheticConfig and a folder name)


def held_out_count(family_size: int, fraction: float) -> int:
    """How many compositions of a family are held out: ceil(fraction * size)."""
    return math.ceil(fraction * family_size)


def _field(default: int | float, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class SyntheticConfig:
    """How much of the synthetic data set to make, and how. Sizes are numbers of samples; 0 leaves a split out.

    Each field's metadata["help"] says what it means (the command line shows it too).
    """

    seed: int = _field(0, "seed of everything random: the same seed gives byte-identical shards")
    pretrain_pairs: int = _field(20000, "image-caption pairs for image-text pre-training (one caption each)")
    retrieval_train: int = _field(5000, "images with captions_per_image captions each, for retrieval fine-tuning")
    retrieval_test: int = _field(500, "held-out images, one per held-out composition: all captions new and distinct")
    images: int = _field(10000, "images alone, for masked image modelling")
    text: int = _field(10000, "text-only documents of 3 to 6 caption sentences, for masked language modelling")
    text_heldout: int = _field(1000, "documents of held-out compositions only, for text MLM on unseen sentences")
    vqa_train: int = _field(10000, "images with one question and ten annotator answers each")
    vqa_val: int = _field(2000, "validation questions (their scenes may use any composition)")
    nlvr2_train: int = _field(6000, "image pairs with a true/false statement")
    nlvr2_dev: int = _field(1000, "validation image pairs")
    image_size: int = _field(64, "side of the square RGB images in pixels")
    jpeg_quality: int = _field(90, "JPEG quality of the stored images")
    shard_size: int = _field(1000, "samples per tar shard")
    captions_per_image: int = _field(5, "captions per retrieval image (distinct phrasings of its composition, 1..8)")
    holdout_fraction: float = _field(0.5, "fraction of each family's compositions held out from all training splits")

    def __post_init__(self) -> None:
        for name in SPLITS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"synthetic split size {name}={value!r} must be a whole number >= 0")
        checks = [
            (self.image_size >= 16, f"image_size={self.image_size} must be at least 16 pixels"),
            (1 <= self.jpeg_quality <= 100, f"jpeg_quality={self.jpeg_quality} must be in 1..100"),
            (self.shard_size >= 1, f"shard_size={self.shard_size} must be at least 1"),
            (1 <= self.captions_per_image <= 8, f"captions_per_image={self.captions_per_image} must be in 1..8"),
            (0.0 < self.holdout_fraction < 1.0, f"holdout_fraction={self.holdout_fraction} must be in (0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        pool = sum(held_out_count(n, self.holdout_fraction) for n in family_sizes().values())
        if self.retrieval_test > pool:
            raise ValueError(
                f"retrieval_test={self.retrieval_test} needs that many held-out compositions but "
                f"holdout_fraction={self.holdout_fraction} holds out {pool}; "
                "lower retrieval_test or raise holdout_fraction"
            )

    @property
    def sizes(self) -> dict[str, int]:
        """Samples per split, in writing order."""
        return {name: getattr(self, name) for name in SPLITS}

    def scaled(self, factor: float) -> "SyntheticConfig":
        """The same config with every split size multiplied by factor (at least 1 sample where it was non-zero)."""
        return replace(self, **{n: max(1, round(v * factor)) if v else 0 for n, v in self.sizes.items()})

    def to_json(self) -> dict:
        """Plain fields, as stored in manifest.json."""
        return asdict(self)
