"""VQA-style questions about synthetic scenes, with ten annotator answers each.

Questions ask about colours, sizes, counts and vertical places, never about which shape an object is (a small ViT
needs thousands of steps to tell shapes a few pixels wide apart; see scene.py):
    yes/no  "is there a red shape?", "is there a large red shape?", "is there a red shape at the top?"
    number  "how many shapes are there?", "how many red shapes are there?"
    other   "what color are the shapes?", "what size is the shape?", "where is the shape?": a colour, size or place
            the whole scene shows (every object alike, or the one object clearly at a place)
Every question can be answered by matching what it names against the image, or by reading a property of the whole
scene. Questions that must first find one object and then read another of its properties ("what size is the red
shape?", "where is the green shape?", "what color is the top shape?") are left out on purpose: the quick start's
tiny model stays near chance on them after 1500 fine-tuning steps and below 0.7 after 3000 (measured), while it
answers the matching forms above correctly 9 times in 10 after 1500; counting by size was as slow.
None depends on left and right, so a horizontal flip keeps every answer true. The wording keeps close to the
captions' words, so that a question stays short under a tokenizer trained on the captions (at most 15 pieces with
the quick start's).

The answer types follow VQA v2 ("yes/no", "number", "other") and are drawn in equal shares; an "other" draw on a
scene with nothing in common becomes a yes/no question, and yes/no questions are balanced. Like human annotators,
most of the ten answers agree with the truth and a few do not, but the truth always has the majority, so it scores
1.0 under the official VQA metric. ``answer_vocabulary`` lists every true answer.
"""

from __future__ import annotations

import random

from vlmo_ds.data.synthetic.captions import with_article
from vlmo_ds.data.synthetic.scene import COLORS, SIZES, WHERE, Scene, SceneObject

NUM_ANSWERS = 10
MAX_COUNT = 4  # no scene has more objects (count compositions, quartets and mixed scenes all stop at 4)
# How many of the ten annotators answer wrongly (at most 4, so the true answer keeps the majority).
_WRONG_WEIGHTS = {0: 45, 1: 25, 2: 15, 3: 10, 4: 5}
# Vertical places a question may name, with a margin on both sides of the captions' bands (scene.py: top <= 0.38,
# middle 0.40-0.60, bottom >= 0.62), so that a mild crop does not move an object across a border.
_PLACE_BANDS = {"top": (0.0, 0.35), "middle": (0.43, 0.57), "bottom": (0.65, 1.0)}
_PLACE_WORDS = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}

Objects = tuple[SceneObject, ...]
Question = tuple[str, str, str]  # (question, true answer, answer type)


def answer_vocabulary() -> list[str]:
    """Every answer a synthetic question can have, in a fixed order: the VQA head's label table."""
    return ["yes", "no", *(str(n) for n in range(MAX_COUNT + 1)), *COLORS, *SIZES, *WHERE]


def place_of(obj: SceneObject) -> str | None:
    """"top", "middle" or "bottom" when the object sits clearly inside that band; None near a border."""
    return next((name for name, (lo, hi) in _PLACE_BANDS.items() if lo <= obj.y <= hi), None)


def _near(obj: SceneObject, place: str) -> bool:
    """Whether the object is in the band or close enough to it that "is there ... at <place>?" would be unclear."""
    lo, hi = _PLACE_BANDS[place]
    return lo - 0.08 <= obj.y <= hi + 0.08


def _counting(objects: Objects, rng: random.Random) -> Question:
    if rng.random() < 0.5:
        return "how many shapes are there?", str(len(objects)), "number"
    # Mostly ask about a colour present; sometimes about one absent (answer 0).
    color = rng.choice([o.color for o in objects]) if rng.random() < 0.75 else rng.choice(tuple(COLORS))
    return f"how many {color} shapes are there?", str(sum(o.color == color for o in objects)), "number"


def _yes_no(objects: Objects, rng: random.Random) -> Question:
    """A yes/no question, "yes" and "no" with equal odds. A place question that cannot reach the drawn answer
    (no colour clearly at that place) becomes a colour question."""
    want_yes = rng.random() < 0.5
    kind = rng.choice(("color", "object", "place"))
    if kind == "place":
        place = rng.choice(WHERE)
        sure = {o.color for o in objects if place_of(o) == place}  # clearly there
        near = {o.color for o in objects if _near(o, place)}  # there or close to the border
        pool = sorted(sure) if want_yes else [c for c in COLORS if c not in near]
        if pool:
            phrase = f"{with_article(rng.choice(pool) + ' shape')} {_PLACE_WORDS[place]}"
            return f"is there {phrase}?", "yes" if want_yes else "no", "yes/no"
        kind = "color"
    if kind == "color":
        present, every = {o.color for o in objects}, list(COLORS)
    else:
        present, every = {f"{o.size} {o.color}" for o in objects}, [f"{z} {c}" for z in SIZES for c in COLORS]
    pool = sorted(present) if want_yes else [v for v in every if v not in present]
    value = rng.choice(pool)
    return f"is there {with_article(value + ' shape')}?", "yes" if value in present else "no", "yes/no"


def _attribute(objects: Objects, rng: random.Random) -> Question | None:
    """A question whose answer is the colour, the size or the place that the whole scene shows (every object has
    the same colour / size, or the one object is clearly at a place); None when the scene has none."""
    one = len(objects) == 1
    the = "the shape" if one else "the shapes"
    verb = "is" if one else "are"
    options: list[Question] = []
    if len({o.color for o in objects}) == 1:
        options.append((f"what color {verb} {the}?", objects[0].color, "other"))
    if len({o.size for o in objects}) == 1:
        options.append((f"what size {verb} {the}?", objects[0].size, "other"))
    if one and place_of(objects[0]) is not None:
        options.append(("where is the shape?", place_of(objects[0]), "other"))
    return rng.choice(options) if options else None


def _wrong_answer(truth: str, answer_type: str, rng: random.Random) -> str:
    """A plausible mistake: a neighbouring count, the opposite yes/no, another value of the same attribute."""
    if answer_type == "yes/no":
        return "no" if truth == "yes" else "yes"
    if answer_type == "number":
        n = int(truth)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    for values in (tuple(COLORS), tuple(SIZES), WHERE):
        if truth in values:
            return rng.choice([v for v in values if v != truth])
    raise ValueError(f"no distractor for the answer {truth!r}")


def annotator_answers(truth: str, answer_type: str, rng: random.Random) -> list[str]:
    """Ten answers as annotators would give them: the truth in the majority, a few plausible mistakes."""
    wrong = rng.choices(tuple(_WRONG_WEIGHTS), weights=tuple(_WRONG_WEIGHTS.values()))[0]
    answers = [truth] * (NUM_ANSWERS - wrong) + [_wrong_answer(truth, answer_type, rng) for _ in range(wrong)]
    rng.shuffle(answers)
    return answers


def sample_question(scene: Scene, rng: random.Random) -> dict:
    """One question about the scene: {"question", "answers", "answer_type", "multiple_choice_answer"}.

    An "other" draw on a scene with no colour, size or place in common falls back to a yes/no question.
    """
    answer_type = rng.choice(("yes/no", "number", "other"))
    question = None
    if answer_type == "other":
        question = _attribute(scene.objects, rng)
    if answer_type == "number":
        question = _counting(scene.objects, rng)
    if question is None:
        question = _yes_no(scene.objects, rng)
    text, truth, answer_type = question
    return {
        "question": text,
        "answers": annotator_answers(truth, answer_type, rng),
        "answer_type": answer_type,
        "multiple_choice_answer": truth,
    }
