"""NLVR2-style statements about a pair of synthetic scenes, with true/false labels.

Every statement says what both images of the pair show: "both images have a large blue shape", "both images have no
red shape", "both images have two green shapes" (a number means exactly that many). Statements speak of colours,
sizes and counts, never of which shape an object is (a small ViT learns shapes far slower than the rest; see
scene.py), and never of left and right inside an image, so a horizontal flip of either image keeps every label;
every statement is at most 16 pieces under the quick start's caption tokenizer.

Why only "both images ...": the published NLVR2 model reads each image in its own pass and joins the two pooled
vectors in its head, so a statement that is the same test applied to each image asks the head for one way of joining
(both passes must agree). With statements that name one image ("image one has ..."), or join the images otherwise
("exactly one image has ...", "image one has more ... than image two", "there are three ... in the two images"), in
the mix, the quick start's tiny model stayed at 0.55-0.63 after 1000-1500 fine-tuning steps, its single-image
statements included, while the same model answers the per-image tests as VQA questions correctly 9 times in 10
after a few hundred steps (measured).

A statement is a small structured spec; `statement_holds` decides its truth from the two scenes and `sentence` words
it. Labels are balanced: a target label is drawn first and statements are drawn until one has that label.
"""

from __future__ import annotations

import random

from vlmo_ds.data.synthetic.captions import NUMBER_WORDS, with_article
from vlmo_ds.data.synthetic.scene import COLORS, SIZES, SceneObject

KINDS = ("has", "lacks", "count")
_TRIES_PER_KIND = 50
MAX_NUMBER = 4  # statements name one to four: the number words the captions use, and as many as one scene holds

Objects = tuple[SceneObject, ...]


def _count(objects: Objects, color: str | None = None, size: str | None = None) -> int:
    return sum((color is None or o.color == color) and (size is None or o.size == size) for o in objects)


def statement_holds(spec: dict, left: Objects, right: Objects) -> bool:
    """The truth of a statement spec about the (left, right) pair of scenes: its test holds for both images."""
    kind, color, size = spec["kind"], spec.get("color"), spec.get("size")
    tests = {"has": lambda objs: _count(objs, color, size) > 0,
             "lacks": lambda objs: _count(objs, color, size) == 0,
             "count": lambda objs: _count(objs, color) == spec.get("n")}
    if kind not in tests:
        raise ValueError(f"unknown NLVR2 statement kind {kind!r}; expected one of {KINDS}")
    return tests[kind](left) and tests[kind](right)


def _shapes(n: int, color: str | None = None, size: str | None = None) -> str:
    """'three red shapes', 'one large shape'."""
    return " ".join(w for w in (NUMBER_WORDS[n], size, color, "shape" if n == 1 else "shapes") if w)


def _noun(color: str | None, size: str | None) -> str:
    """'a large red shape', 'an orange shape'."""
    return with_article(" ".join(w for w in (size, color, "shape") if w))


def sentence(spec: dict) -> str:
    """The statement in words."""
    kind, color, size = spec["kind"], spec.get("color"), spec.get("size")
    if kind == "has":
        return f"both images have {_noun(color, size)}"
    if kind == "lacks":
        return f"both images have no {' '.join(w for w in (size, color, 'shape') if w)}"
    if kind == "count":
        return f"both images have {_shapes(spec['n'], color)}"
    raise ValueError(f"unknown NLVR2 statement kind {kind!r}; expected one of {KINDS}")


def _random_spec(kind: str, left: Objects, right: Objects, rng: random.Random) -> dict:
    """A statement of the kind, often about what the images show, so that true and false are both common."""
    color = rng.choice([o.color for o in left + right]) if rng.random() < 0.7 else rng.choice(tuple(COLORS))
    if kind == "count":
        spec_color = color if rng.random() < 0.5 else None
        shown = _count(rng.choice((left, right)), spec_color)
        return {"kind": kind, "color": spec_color, "n": min(MAX_NUMBER, max(1, shown + rng.choice((-1, 0, 0, 1))))}
    size = rng.choice(tuple(SIZES)) if rng.random() < 0.5 else None
    if size is not None and rng.random() < 0.4:  # "a large shape": true of both images far more often
        color = None
    return {"kind": kind, "color": color, "size": size}


def sample_statement(left: Objects, right: Objects, rng: random.Random) -> dict:
    """{"sentence", "label", "statement"} for the pair.

    The label is drawn first, with equal odds, then a kind, and statements of that kind are drawn until one has
    that label. A kind that cannot reach the label for this pair moves on to another kind (true statements need
    what the two images share, so each kind is somewhat more often false than true), while the labels stay even.
    """
    target = rng.random() < 0.5
    kinds = list(KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        for _ in range(_TRIES_PER_KIND):
            spec = _random_spec(kind, left, right, rng)
            if statement_holds(spec, left, right) == target:
                return {"sentence": sentence(spec), "label": target, "statement": spec}
    raise RuntimeError("no NLVR2 statement of any kind reached the drawn label; the scenes are degenerate")
