"""Scenes of the synthetic data set: the word lists, compositions, and sampling of object layouts.

A *composition* is what a caption states (for example "a red shape above a blue shape"); a *scene* is one concrete
layout that makes it true (object positions, shapes, exact radii, colour jitter, background). Several scenes share a
composition; a caption names its composition exactly, so held-out compositions give held-out captions.

Captions, VQA questions and NLVR2 statements state colours, sizes, counts, vertical places and vertical order; every
object also has a shape, drawn at random and named nowhere. Trios and quartets state a set of colours, in any layout.
The reason is measured, not taste: a small ViT with 16-pixel patches tells colours, sizes, places and vertical order apart within a few hundred steps, but needs thousands to tell
shapes a few pixels wide apart, so captions that hinge on shape would make the CPU quick start measure patience, not
whether vision-language training works. For the same reason there are no ordered chains of three (its contrastive text
features stay nearly blind to the order of three colours for the whole quick start; measured).

Coordinates are fractions of the image side (x to the right, y downwards), so a scene renders at any image size.
Every statement the data set makes depends on x only through |dx|, and every shape is mirror-symmetric, so a
horizontal flip (x -> 1 - x) of a scene keeps all captions, answers and labels true. Objects keep a margin from the
border so that a mild random crop usually keeps them whole.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 215),
    "blue": (40, 80, 225),
    "purple": (145, 60, 195),
    "white": (245, 245, 245),
    "pink": (245, 130, 195),
    "brown": (130, 80, 40),
    "black": (25, 25, 25),
    "lime": (165, 235, 70),
}
SIZES: dict[str, float] = {"small": 0.085, "large": 0.15}  # object radius as a fraction of the image side
WHERE: tuple[str, ...] = ("top", "middle", "bottom")
COUNTS: tuple[int, ...] = (2, 3, 4)
FAMILIES: tuple[str, ...] = ("single", "count", "relation", "pair", "trio", "quartet")
GROUP_SIZES: dict[str, int] = {"trio": 3, "quartet": 4}  # sets of distinct colours, in any layout

MARGIN = 0.07  # empty border around all objects, so a mild crop rarely cuts one
GAP = 0.03  # least empty space between two objects
# Bands that make a vertical statement true; the sampler draws well inside them.
TOP_MAX, MIDDLE_LO, MIDDLE_HI, BOTTOM_MIN = 0.38, 0.40, 0.60, 0.62
ABOVE_MIN_DY = 0.20  # "A above B" means A's centre is at least this much higher than B's
PAIR_MAX_DY, PAIR_MIN_DX = 0.12, 0.16  # "A next to B": about the same height, clearly apart


@dataclass(frozen=True)
class Part:
    """One kind of object named in a caption: a colour, and a size unless size is None (the caption does not state it)."""

    color: str
    size: str | None = None


@dataclass(frozen=True)
class Composition:
    """What a caption states. relation: parts (upper, lower); pair, trio, quartet: unordered, in canonical order."""

    family: str
    parts: tuple[Part, ...]
    where: str | None = None  # single only
    count: int = 1  # count family: how many copies of parts[0]

    @property
    def key(self) -> str:
        """A stable, readable id, e.g. 'relation/red/blue' or 'single/large-red/top'."""
        names = ["-".join(p for p in (part.size, part.color) if p) for part in self.parts]
        extra = {"single": [self.where], "count": [str(self.count)]}.get(self.family, [])
        return "/".join([self.family, *names, *(e for e in extra if e)])


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; x, y, r are fractions of the image side, rgb the jittered fill colour."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    r: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A full scene: objects, background (grey level, tint, texture, noise seed) and its composition key or None."""

    objects: tuple[SceneObject, ...]
    background: dict = field(default_factory=dict)
    composition: str | None = None

    def to_json(self) -> dict:
        """The structured description stored next to each image."""
        return {
            "composition": self.composition,
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "x": o.x, "y": o.y, "r": o.r, "rgb": list(o.rgb)}
                for o in self.objects
            ],
            "background": dict(self.background),
        }

    @staticmethod
    def from_json(data: dict) -> "Scene":
        """Inverse of to_json."""
        objects = tuple(
            SceneObject(o["shape"], o["color"], o["size"], o["x"], o["y"], o["r"], tuple(o["rgb"]))
            for o in data["objects"]
        )
        return Scene(objects, dict(data["background"]), data.get("composition"))


def enumerate_compositions() -> list[Composition]:
    """All compositions in a fixed order: 72 single, 72 count, 132 relation, 66 pair, 220 trio, 495 quartet (1057)."""
    sized = [Part(c, z) for z in SIZES for c in COLORS]
    plain = [Part(c) for c in COLORS]
    comps = [Composition("single", (p,), where=w) for p in sized for w in WHERE]
    comps += [Composition("count", (p,), count=n) for p in sized for n in COUNTS]
    comps += [Composition("relation", (a, b)) for a, b in itertools.permutations(plain, 2)]
    comps += [Composition("pair", (a, b)) for a, b in itertools.combinations(plain, 2)]
    for family, n in GROUP_SIZES.items():
        comps += [Composition(family, parts) for parts in itertools.combinations(plain, n)]
    return comps


def family_sizes() -> dict[str, int]:
    """Number of compositions per family."""
    comps = enumerate_compositions()
    return {family: sum(c.family == family for c in comps) for family in FAMILIES}


def flip_scene(scene: Scene) -> Scene:
    """The scene mirrored left-right, as a random horizontal flip of its image shows it."""
    return replace(scene, objects=tuple(replace(o, x=round(1.0 - o.x, 4)) for o in scene.objects))


def _matches(obj: SceneObject, part: Part) -> bool:
    return obj.color == part.color and (part.size is None or obj.size == part.size)


def _where_holds(where: str, y: float) -> bool:
    return {"top": y <= TOP_MAX, "middle": MIDDLE_LO <= y <= MIDDLE_HI, "bottom": y >= BOTTOM_MIN}[where]


def composition_holds(comp: Composition, objects: tuple[SceneObject, ...]) -> bool:
    """Whether the objects show exactly what the composition states (nothing missing, nothing extra)."""
    if comp.family == "single":
        return len(objects) == 1 and _matches(objects[0], comp.parts[0]) and _where_holds(comp.where, objects[0].y)
    if comp.family == "count":
        return len(objects) == comp.count and all(_matches(o, comp.parts[0]) for o in objects)
    if comp.family in GROUP_SIZES:
        return sorted(o.color for o in objects) == sorted(p.color for p in comp.parts)
    if len(objects) != 2:
        return False
    a, b = comp.parts
    for first, second in (objects, objects[::-1]):
        if _matches(first, a) and _matches(second, b):
            if comp.family == "relation" and second.y - first.y >= ABOVE_MIN_DY:
                return True
            side_by_side = abs(first.y - second.y) <= PAIR_MAX_DY and abs(first.x - second.x) >= PAIR_MIN_DX
            if comp.family == "pair" and side_by_side:
                return True
    return False


def _jitter_rgb(color: str, rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLORS[color])


def _radius(size: str, rng: random.Random) -> float:
    return SIZES[size] * rng.uniform(0.92, 1.08)


def _free(x: float, y: float, r: float, placed: list[tuple[float, float, float]]) -> bool:
    return all((x - px) ** 2 + (y - py) ** 2 >= (r + pr + GAP) ** 2 for px, py, pr in placed)


def _grid_positions(radii: list[float], rng: random.Random) -> list[tuple[float, float]]:
    """Distinct cells of a 3x3 (all small) or 2x2 grid, jittered inside the cell: never overlapping, always fits."""
    cells_per_side = 3 if max(radii) < SIZES["large"] * 0.9 else 2
    cell = (1.0 - 2 * MARGIN) / cells_per_side
    cells = rng.sample(range(cells_per_side**2), len(radii))
    positions = []
    for r, c in zip(radii, cells):
        lo_x, lo_y = MARGIN + (c % cells_per_side) * cell, MARGIN + (c // cells_per_side) * cell
        slack = max(0.0, cell - 2 * r - GAP)
        positions.append((lo_x + GAP / 2 + r + rng.uniform(0, slack), lo_y + GAP / 2 + r + rng.uniform(0, slack)))
    return positions


def _band_positions(
    radii: list[float], bands: list[tuple[tuple[float, float], tuple[float, float]]], rng: random.Random
) -> list[tuple[float, float]]:
    """Rejection-sample one position per object inside its (x band, y band), kept apart from the others."""
    for _ in range(1000):
        placed: list[tuple[float, float, float]] = []
        for r, ((x0, x1), (y0, y1)) in zip(radii, bands):
            x = rng.uniform(max(x0, MARGIN + r), min(x1, 1 - MARGIN - r))
            y = rng.uniform(max(y0, MARGIN + r), min(y1, 1 - MARGIN - r))
            if not _free(x, y, r, placed):
                break
            placed.append((x, y, r))
        else:
            return [(x, y) for x, y, _ in placed]
    raise RuntimeError("could not place the objects of a synthetic scene; the layout bands are too tight")


def _background(rng: random.Random) -> dict:
    return {
        "gray": rng.randint(85, 150),
        "tint": [rng.randint(-10, 10) for _ in range(3)],
        "texture": rng.choice(("plain", "noise", "gradient")),
        "seed": rng.getrandbits(32),
    }


def _build(
    colors: list[str],
    sizes: list[str],
    positions_fn: Callable[[list[float]], list[tuple[float, float]]],
    rng: random.Random,
    key: str | None,
) -> Scene:
    """Objects of the given colours and sizes, each of a random shape, placed by positions_fn."""
    shapes = [rng.choice(SHAPES) for _ in colors]
    radii = [_radius(z, rng) for z in sizes]
    positions = positions_fn(radii)
    objects = tuple(
        SceneObject(shape, color, z, round(x, 4), round(y, 4), round(r, 4), _jitter_rgb(color, rng))
        for shape, color, z, r, (x, y) in zip(shapes, colors, sizes, radii, positions)
    )
    return Scene(objects, _background(rng), key)


def sample_scene(comp: Composition, rng: random.Random) -> Scene:
    """A random scene that shows exactly the composition."""
    anywhere = (0.0, 1.0)
    if comp.family == "count":
        colors, sizes = [comp.parts[0].color] * comp.count, [comp.parts[0].size] * comp.count
        return _build(colors, sizes, lambda radii: _grid_positions(radii, rng), rng, comp.key)
    if comp.family in GROUP_SIZES:
        colors, sizes = [p.color for p in comp.parts], [rng.choice(tuple(SIZES)) for _ in comp.parts]
        return _build(colors, sizes, lambda radii: _grid_positions(radii, rng), rng, comp.key)
    if comp.family == "single":
        y_band = {
            "top": (0.0, TOP_MAX - 0.02),
            "middle": (MIDDLE_LO + 0.03, MIDDLE_HI - 0.03),
            "bottom": (BOTTOM_MIN + 0.02, 1.0),
        }[comp.where]
        parts, sizes, bands = list(comp.parts), [comp.parts[0].size], [(anywhere, y_band)]
    elif comp.family == "relation":
        parts, sizes = list(comp.parts), [rng.choice(tuple(SIZES)) for _ in comp.parts]
        bands = [(anywhere, (0.0, TOP_MAX)), (anywhere, (BOTTOM_MIN, 1.0))]
    else:
        parts = list(comp.parts) if rng.random() < 0.5 else list(comp.parts[::-1])  # either part may be on the left
        sizes = [rng.choice(tuple(SIZES)) for _ in comp.parts]
        y = rng.uniform(0.32, 0.68)
        bands = [((0.0, 0.40), (y - 0.04, y + 0.04)), ((0.60, 1.0), (y - 0.04, y + 0.04))]
    colors = [p.color for p in parts]
    return _build(colors, sizes, lambda radii: _band_positions(radii, bands, rng), rng, comp.key)


def sample_mixed_scene(rng: random.Random, max_objects: int = 4) -> Scene:
    """A scene of 1..max_objects unrelated objects (for questions and NLVR2 statements); it has no composition."""
    n = rng.randint(1, max_objects)
    colors = [rng.choice(tuple(COLORS)) for _ in range(n)]
    sizes = [rng.choice(tuple(SIZES)) for _ in range(n)]
    return _build(colors, sizes, lambda radii: _grid_positions(radii, rng), rng, None)
