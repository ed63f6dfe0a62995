"""Compositional captions for synthetic scenes, in several phrasings.

Every phrasing of a composition names all that the composition states (colours, sizes where stated, count, vertical
place, order or set of colours), so a caption string belongs to exactly one composition: holding out compositions holds
out their captions. Captions speak of top, middle, bottom, above, below and next to, never of left or right, so they
stay true when an image is flipped horizontally.
"""

from __future__ import annotations

import itertools
import random

from vlmo_ds.data.synthetic.scene import Composition, Part, enumerate_compositions

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
WHERE_WORDS: dict[str, tuple[str, ...]] = {
    "top": ("at the top", "near the top"),
    "middle": ("in the middle", "in the center"),
    "bottom": ("at the bottom", "near the bottom"),
}
ABOVE_WORDS = ("above", "over")
BELOW_WORDS = ("below", "under", "beneath")
NEXT_WORDS = ("next to", "beside")
NOUNS = ("shape", "object")  # captions do not say which shape (see scene.py); one noun per caption


def plural(shape: str) -> str:
    """'cross' -> 'crosses', 'shape' -> 'shapes'."""
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def with_article(phrase: str) -> str:
    """'orange shape' -> 'an orange shape', 'red shape' -> 'a red shape'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(part: Part, noun: str, size_word: str | None = None, many: bool = False) -> str:
    words = [size_word, part.color, plural(noun) if many else noun]
    return " ".join(w for w in words if w)


def _single(comp: Composition) -> list[str]:
    part, out = comp.parts[0], []
    for noun, size_word, where in itertools.product(NOUNS, SIZE_WORDS[part.size], WHERE_WORDS[comp.where]):
        thing = with_article(_noun(part, noun, size_word))
        out += [
            f"{thing} {where}",
            f"there is {thing} {where}",
            f"{where} there is {thing}",
            f"a picture of {thing} {where}",
            f"an image with one {_noun(part, noun, size_word)} {where}",
        ]
    return out


def _count(comp: Composition) -> list[str]:
    part, out = comp.parts[0], []
    for noun, size_word in itertools.product(NOUNS, SIZE_WORDS[part.size]):
        things = f"{NUMBER_WORDS[comp.count]} {_noun(part, noun, size_word, many=True)}"
        out += [things, f"there are {things}", f"a picture of {things}", f"an image with {things}"]
    return out


def _relation(comp: Composition) -> list[str]:
    out = []
    for noun in NOUNS:
        upper, lower = (with_article(_noun(p, noun)) for p in comp.parts)
        for word in ABOVE_WORDS:
            out += [f"{upper} {word} {lower}", f"there is {upper} {word} {lower}",
                    f"a picture of {upper} {word} {lower}"]
        for word in BELOW_WORDS:
            out += [f"{lower} {word} {upper}", f"there is {lower} {word} {upper}"]
    return out


def _pair(comp: Composition) -> list[str]:
    out = []
    for noun in NOUNS:
        for first, second in itertools.permutations(with_article(_noun(p, noun)) for p in comp.parts):
            out += [f"{first} and {second}", f"{first} and {second} side by side",
                    f"a picture of {first} and {second}"]
            out += [f"{first} {word} {second}" for word in NEXT_WORDS]
            out.append(f"there is {first} next to {second}")
    return out


def _group(comp: Composition) -> list[str]:
    """A set of colours, named in several orders (the order carries no meaning)."""
    colors, out = [p.color for p in comp.parts], []
    many = NUMBER_WORDS[len(colors)]
    for noun, turn in itertools.product(NOUNS, range(len(colors))):
        names = colors[turn:] + colors[:turn]
        listed = " ".join(names[:-1]) + f" and {names[-1]}"
        out += [f"{listed} {plural(noun)}", f"{many} {plural(noun)} {listed}"]
    return out


_PHRASINGS = {"single": _single, "count": _count, "relation": _relation, "pair": _pair, "trio": _group,
              "quartet": _group}


def phrasings(comp: Composition) -> list[str]:
    """All captions of a composition, distinct, in a fixed order."""
    return list(dict.fromkeys(_PHRASINGS[comp.family](comp)))


def sample_captions(comp: Composition, rng: random.Random, k: int = 1) -> list[str]:
    """k distinct captions of the composition (every composition has at least 8 phrasings)."""
    options = phrasings(comp)
    if not 1 <= k <= len(options):
        raise ValueError(f"asked for {k} captions of {comp.key}, which has {len(options)} phrasings; use 1..8")
    return rng.sample(options, k)


def caption_vocabulary() -> list[str]:
    """Every word that any caption uses, sorted."""
    words = {w for comp in enumerate_compositions() for caption in phrasings(comp) for w in caption.split()}
    return sorted(words)


def document(sentences: list[str]) -> str:
    """A short paragraph of caption sentences, as a text-only training document."""
    return " ".join(s + "." for s in sentences)

