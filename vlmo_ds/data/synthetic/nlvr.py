"""NLVR2-style statements about a pair of synthetic scenes, with true/false labels.

A statement compares or describes the two images of a pair ("the left image contains more circles than the right
image", "both images contain a blue shape"); here left and right name the two images, not places inside one. A
statement is a small structured spec; `statement_holds` decides its truth from the two scenes and `sentence` words it.
Labels are balanced: a target label is drawn first and statements are drawn until one has that label.
"""

from __future__ import annotations

import random

from vlmo_ds.data.synthetic.captions import NUMBER_WORDS, plural, with_article
from vlmo_ds.data.synthetic.scene import ABOVE_MIN_DY, COLORS, SHAPES, SceneObject

KINDS = ("more", "more_color", "same_count", "both", "one", "neither", "exactly", "total", "above")
_OTHER = {"left": "right", "right": "left"}
_TRIES_PER_KIND = 50

Objects = tuple[SceneObject, ...]


def _count(objects: Objects, shape: str | None = None, color: str | None = None) -> int:
    return sum((shape is None or o.shape == shape) and (color is None or o.color == color) for o in objects)


def _has_above(objects: Objects, upper: str, lower: str) -> bool:
    highs = [o for o in objects if o.shape == upper]
    return any(low.shape == lower and low.y - high.y >= ABOVE_MIN_DY for high in highs for low in objects)


def statement_holds(spec: dict, left: Objects, right: Objects) -> bool:
    """The truth of a statement spec about the (left, right) pair of scenes."""
    images = {"left": left, "right": right}
    kind, shape, color = spec["kind"], spec.get("shape"), spec.get("color")
    if kind in ("more", "more_color"):
        mine, other = images[spec["side"]], images[_OTHER[spec["side"]]]
        return _count(mine, shape, color) > _count(other, shape, color)
    if kind == "same_count":
        return _count(left, shape) == _count(right, shape)
    if kind == "both":
        return _count(left, shape, color) > 0 and _count(right, shape, color) > 0
    if kind == "one":
        return (_count(left, shape, color) > 0) != (_count(right, shape, color) > 0)
    if kind == "neither":
        return _count(left, shape) == 0 and _count(right, shape) == 0
    if kind == "exactly":
        return _count(images[spec["side"]], shape) == spec["n"]
    if kind == "total":
        return _count(left, shape) + _count(right, shape) == spec["n"]
    if kind == "above":
        return _has_above(images[spec["side"]], spec["upper"], spec["lower"])
    raise ValueError(f"unknown NLVR2 statement kind {kind!r}; expected one of {KINDS}")


def _amount(n: int, shape: str) -> str:
    return f"{NUMBER_WORDS[n]} {shape if n == 1 else plural(shape)}"


def sentence(spec: dict) -> str:
    """The statement in words."""
    kind, shape, color = spec["kind"], spec.get("shape"), spec.get("color")
    side = spec.get("side")
    if kind == "more":
        return f"the {side} image contains more {plural(shape)} than the {_OTHER[side]} image"
    if kind == "more_color":
        return f"the {side} image contains more {color} shapes than the {_OTHER[side]} image"
    if kind == "same_count":
        return f"both images contain the same number of {plural(shape)}"
    noun = with_article(" ".join(w for w in (color, shape or "shape") if w))
    if kind == "both":
        return f"both images contain {noun}"
    if kind == "one":
        return f"exactly one image contains {noun}"
    if kind == "neither":
        return f"neither image contains {noun}"
    if kind == "exactly":
        return f"the {side} image contains exactly {_amount(spec['n'], shape)}"
    if kind == "total":
        verb = "is" if spec["n"] == 1 else "are"
        return f"there {verb} exactly {_amount(spec['n'], shape)} in the two images"
    if kind == "above":
        return f"the {side} image shows {with_article(spec['upper'])} above {with_article(spec['lower'])}"
    raise ValueError(f"unknown NLVR2 statement kind {kind!r}; expected one of {KINDS}")


def _random_spec(kind: str, left: Objects, right: Objects, rng: random.Random) -> dict:
    """A statement of the kind, often about what the images show, so that true and false are both common."""
    both = left + right
    shape = rng.choice([o.shape for o in both]) if rng.random() < 0.7 else rng.choice(SHAPES)
    color = rng.choice([o.color for o in both]) if rng.random() < 0.7 else rng.choice(tuple(COLORS))
    side = rng.choice(("left", "right"))
    if kind == "more":
        return {"kind": kind, "side": side, "shape": shape}
    if kind == "more_color":
        return {"kind": kind, "side": side, "color": color}
    if kind in ("same_count", "neither"):
        return {"kind": kind, "shape": shape}
    if kind == "both":
        return {"kind": kind, **rng.choice(({"shape": shape}, {"color": color}, {"shape": shape, "color": color}))}
    if kind == "one":
        return {"kind": kind, "shape": shape, "color": color}
    if kind == "exactly":
        n = max(1, _count(left if side == "left" else right, shape) + rng.choice((-1, 0, 0, 1)))
        return {"kind": kind, "side": side, "shape": shape, "n": n}
    if kind == "total":
        n = min(max(NUMBER_WORDS), max(1, _count(both, shape) + rng.choice((-1, 0, 0, 1))))
        return {"kind": kind, "shape": shape, "n": n}
    image = left if side == "left" else right
    upper, lower = (rng.choice(image).shape if rng.random() < 0.8 else rng.choice(SHAPES) for _ in range(2))
    return {"kind": "above", "side": side, "upper": upper, "lower": lower}


def sample_statement(left: Objects, right: Objects, rng: random.Random) -> dict:
    """{"sentence", "label", "statement"} for the pair.

    The kind and the label are drawn first, each with equal odds, and statements of that kind are drawn until one
    has that label, so neither the kind nor the wording gives the label away. A pair for which a kind cannot reach
    the label (rare: e.g. no "above" in either image and a true label wanted) moves on to another kind.
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
