"""The splits of the synthetic data set: which compositions each may use, and how one sample of each is made.

Compositions are split once per seed: a fixed fraction of every family is held out. Every split that trains a model
draws only training compositions, so no held-out caption occurs in training; retrieval_test and text_heldout use only
held-out compositions; vqa_val and nlvr2_dev draw from all. Each sample is a pure function of (seed, split, index)
through its own random generator, so samples can be made in any order, by any number of processes, with identical
bytes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from vlmo_ds.data.synthetic.captions import document, sample_captions
from vlmo_ds.data.synthetic.config import SPLITS, SyntheticConfig, held_out_count
from vlmo_ds.data.synthetic.nlvr import sample_statement
from vlmo_ds.data.synthetic.questions import sample_question
from vlmo_ds.data.synthetic.render import encode_jpeg, render
from vlmo_ds.data.synthetic.scene import (
    FAMILIES,
    Composition,
    Scene,
    enumerate_compositions,
    sample_mixed_scene,
    sample_scene,
)

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes}) as one tar group


def _rng(seed: int, *names: object) -> random.Random:
    # Seeding with a string hashes it with SHA-512: stable across runs, processes and PYTHONHASHSEED.
    return random.Random(":".join(["vlmo_ds.synthetic", str(seed), *map(str, names)]))


@dataclass
class Plan:
    """The composition pools of one seed: training and held-out compositions per family, and their visiting orders."""

    config: SyntheticConfig
    train: dict[str, tuple[Composition, ...]]
    held_out: dict[str, tuple[Composition, ...]]
    held_out_order: tuple[Composition, ...]  # retrieval_test takes these from the front, one image each
    _cycles: dict[int, tuple[Composition, ...]] = field(default_factory=dict, repr=False)

    @staticmethod
    def build(config: SyntheticConfig) -> "Plan":
        """Hold out ceil(holdout_fraction * n) compositions of each family, chosen by the seed."""
        rng = _rng(config.seed, "holdout")
        train, held_out = {}, {}
        every = enumerate_compositions()
        for family in FAMILIES:
            comps = [c for c in every if c.family == family]
            rng.shuffle(comps)
            cut = held_out_count(len(comps), config.holdout_fraction)
            held_out[family], train[family] = tuple(comps[:cut]), tuple(comps[cut:])
        order = [c for family in FAMILIES for c in held_out[family]]
        rng.shuffle(order)
        return Plan(config, train, held_out, tuple(order))

    def train_cycle(self, epoch: int) -> tuple[Composition, ...]:
        """The training compositions in the seeded order of one pass: retrieval_train visits each once per pass."""
        if epoch not in self._cycles:
            comps = [c for family in FAMILIES for c in self.train[family]]
            _rng(self.config.seed, "train_cycle", epoch).shuffle(comps)
            self._cycles[epoch] = tuple(comps)
        return self._cycles[epoch]


def _any_composition(pool: dict[str, tuple[Composition, ...]], rng: random.Random) -> Composition:
    """A composition of the pool, each with equal odds: training sees the families in the proportions that the
    held-out compositions (and so retrieval_test) have them."""
    return rng.choice([c for family in FAMILIES for c in pool[family]])


def _mixture_scene(pool: dict[str, tuple[Composition, ...]], rng: random.Random) -> Scene:
    """Half composed scenes (from the pool), half free mixtures of one to four objects."""
    return sample_scene(_any_composition(pool, rng), rng) if rng.random() < 0.5 else sample_mixed_scene(rng)


def _jpeg(plan: Plan, scene: Scene) -> bytes:
    return encode_jpeg(render(scene, plan.config.image_size), plan.config.jpeg_quality)


def _json(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True).encode("utf-8")


def _pretrain_pair(plan: Plan, rng: random.Random, index: int) -> dict[str, bytes]:
    comp = _any_composition(plan.train, rng)
    scene = sample_scene(comp, rng)
    caption = sample_captions(comp, rng)[0]
    meta = {"caption": caption, "scene": scene.to_json()}
    return {"jpg": _jpeg(plan, scene), "txt": caption.encode(), "json": _json(meta)}


def _retrieval(plan: Plan, rng: random.Random, index: int, comp: Composition) -> dict[str, bytes]:
    scene = sample_scene(comp, rng)
    captions = sample_captions(comp, rng, plan.config.captions_per_image)
    meta = {"captions": captions, "image_id": index, "scene": scene.to_json()}
    return {"jpg": _jpeg(plan, scene), "txt": captions[0].encode(), "json": _json(meta)}


def _retrieval_train(plan: Plan, rng: random.Random, index: int) -> dict[str, bytes]:
    cycle_len = sum(len(v) for v in plan.train.values())
    return _retrieval(plan, rng, index, plan.train_cycle(index // cycle_len)[index % cycle_len])


def _retrieval_test(plan: Plan, rng: random.Random, index: int) -> dict[str, bytes]:
    return _retrieval(plan, rng, index, plan.held_out_order[index])


def _image(plan: Plan, rng: random.Random, index: int) -> dict[str, bytes]:
    return {"jpg": _jpeg(plan, _mixture_scene(plan.train, rng))}


def _text(pool: dict[str, tuple[Composition, ...]], rng: random.Random) -> dict[str, bytes]:
    sentences = [sample_captions(_any_composition(pool, rng), rng)[0] for _ in range(rng.randint(3, 6))]
    return {"txt": document(sentences).encode()}


def _vqa(plan: Plan, rng: random.Random, index: int, pool: dict[str, tuple[Composition, ...]]) -> dict[str, bytes]:
    scene = _mixture_scene(pool, rng)
    meta = {"question_id": index, "image_id": index, **sample_question(scene, rng), "scene": scene.to_json()}
    return {"jpg": _jpeg(plan, scene), "json": _json(meta)}


def _nlvr2(plan: Plan, rng: random.Random, index: int, pool: dict, prefix: str) -> dict[str, bytes]:
    left, right = _mixture_scene(pool, rng), _mixture_scene(pool, rng)
    meta = {"identifier": f"{prefix}-{index}", **sample_statement(left.objects, right.objects, rng)}
    meta["scenes"] = {"left": left.to_json(), "right": right.to_json()}
    return {"left.jpg": _jpeg(plan, left), "right.jpg": _jpeg(plan, right), "json": _json(meta)}


def _all_compositions(plan: Plan) -> dict[str, tuple[Composition, ...]]:
    return {f: plan.train[f] + plan.held_out[f] for f in FAMILIES}


def make_sample(plan: Plan, split: str, index: int) -> Sample:
    """Sample number `index` of a split as (key, members); the key has no dots (WebDataset splits names at dots)."""
    rng = _rng(plan.config.seed, split, index)
    makers = {
        "pretrain_pairs": lambda: _pretrain_pair(plan, rng, index),
        "retrieval_train": lambda: _retrieval_train(plan, rng, index),
        "retrieval_test": lambda: _retrieval_test(plan, rng, index),
        "images": lambda: _image(plan, rng, index),
        "text": lambda: _text(plan.train, rng),
        "text_heldout": lambda: _text(plan.held_out, rng),
        "vqa_train": lambda: _vqa(plan, rng, index, plan.train),
        "vqa_val": lambda: _vqa(plan, rng, index, _all_compositions(plan)),
        "nlvr2_train": lambda: _nlvr2(plan, rng, index, plan.train, "train"),
        "nlvr2_dev": lambda: _nlvr2(plan, rng, index, _all_compositions(plan), "dev"),
    }
    if split not in makers:
        raise ValueError(f"unknown synthetic split {split!r}; expected one of {SPLITS}")
    return f"{index:08d}", makers[split]()
