"""VQA-style questions about synthetic scenes, with ten annotator answers each.

Questions are about shapes, colours, sizes, counts and vertical order ("what color is the circle?", "how many squares
are there?", "is there a red star?", "what shape is at the top?"); none depends on left and right. The answer types
follow VQA v2 ("yes/no", "number", "other") and are drawn in equal shares; yes/no questions are balanced. Like human
annotators, most of the ten answers agree with the truth and a few do not, but the truth always has the majority.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from vlmo_ds.data.synthetic.captions import plural, with_article
from vlmo_ds.data.synthetic.scene import ABOVE_MIN_DY, COLORS, SHAPES, SIZES, Scene, SceneObject

NUM_ANSWERS = 10
# How many of the ten annotators answer wrongly (at most 4, so the true answer keeps the majority).
_WRONG_WEIGHTS = {0: 45, 1: 25, 2: 15, 3: 10, 4: 5}

Question = tuple[str, str, str]  # (question, true answer, answer type)


def _counting(objects: tuple[SceneObject, ...], rng: random.Random) -> Question:
    shapes_here = sorted({o.shape for o in objects})
    colors_here = sorted({o.color for o in objects})
    kind = rng.choice(("shape", "color", "all", "both"))
    if kind == "all":
        return "how many shapes are there?", str(len(objects)), "number"
    # Mostly ask about something present; sometimes about something absent (answer 0).
    shape = rng.choice(shapes_here) if rng.random() < 0.75 else rng.choice(SHAPES)
    color = rng.choice(colors_here) if rng.random() < 0.75 else rng.choice(tuple(COLORS))
    if kind == "shape":
        n = sum(o.shape == shape for o in objects)
        return f"how many {plural(shape)} are there?", str(n), "number"
    if kind == "color":
        n = sum(o.color == color for o in objects)
        return f"how many {color} shapes are there?", str(n), "number"
    n = sum(o.shape == shape and o.color == color for o in objects)
    return f"how many {color} {plural(shape)} are there?", str(n), "number"


def _yes_no(objects: tuple[SceneObject, ...], rng: random.Random) -> Question:
    want_yes = rng.random() < 0.5
    kind = rng.choice(("object", "shape", "color"))
    present = {
        "object": {(o.color, o.shape) for o in objects},
        "shape": {o.shape for o in objects},
        "color": {o.color for o in objects},
    }[kind]
    every = {
        "object": [(c, s) for c in COLORS for s in SHAPES],
        "shape": list(SHAPES),
        "color": list(COLORS),
    }[kind]
    pool = sorted(present) if want_yes else [v for v in every if v not in present]
    value = rng.choice(pool)
    answer = "yes" if value in present else "no"
    if kind == "object":
        return f"is there {with_article(f'{value[0]} {value[1]}')}?", answer, "yes/no"
    if kind == "shape":
        return f"is there {with_article(value)}?", answer, "yes/no"
    return f"is there {with_article(value)} shape?", answer, "yes/no"


def _unique(objects: tuple[SceneObject, ...], key: Callable[[SceneObject], object]) -> list[SceneObject]:
    return [o for o in objects if sum(key(p) == key(o) for p in objects) == 1]


def _attribute(objects: tuple[SceneObject, ...], rng: random.Random) -> Question | None:
    """A question whose answer is a colour, shape or size; None when the scene has nothing unambiguous to ask."""
    options: list[Question] = []
    for o in _unique(objects, lambda o: o.shape):
        options.append((f"what color is the {o.shape}?", o.color, "other"))
    for o in _unique(objects, lambda o: o.color):
        options.append((f"what shape is the {o.color} object?", o.shape, "other"))
    for o in _unique(objects, lambda o: (o.color, o.shape)):
        options.append((f"what size is the {o.color} {o.shape}?", o.size, "other"))
    if len(objects) >= 2:
        by_height = sorted(objects, key=lambda o: o.y)
        top, second, last, before = by_height[0], by_height[1], by_height[-1], by_height[-2]
        if second.y - top.y >= ABOVE_MIN_DY:  # only when "the top one" is plain to see
            options.append(("what shape is at the top?", top.shape, "other"))
            options.append(("what color is the top shape?", top.color, "other"))
        if last.y - before.y >= ABOVE_MIN_DY:
            options.append(("what shape is at the bottom?", last.shape, "other"))
    return rng.choice(options) if options else None


def _wrong_answer(truth: str, answer_type: str, rng: random.Random) -> str:
    """A plausible mistake: a neighbouring count, the opposite yes/no, another value of the same attribute."""
    if answer_type == "yes/no":
        return "no" if truth == "yes" else "yes"
    if answer_type == "number":
        n = int(truth)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    for values in (tuple(COLORS), SHAPES, tuple(SIZES)):
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
    """One question about the scene: {"question", "answers", "answer_type", "multiple_choice_answer"}."""
    answer_type = rng.choice(("yes/no", "number", "other"))
    question = None
    if answer_type == "other":
        question = _attribute(scene.objects, rng)
    if question is None:
        question = _yes_no(scene.objects, rng) if answer_type == "yes/no" else _counting(scene.objects, rng)
    text, truth, answer_type = question
    return {
        "question": text,
        "answers": annotator_answers(truth, answer_type, rng),
        "answer_type": answer_type,
        "multiple_choice_answer": truth,
    }
