"""Drawing synthetic scenes with Pillow and encoding them as JPEG.

Rendering is a pure function of the scene (its background carries the seed of its texture noise), so the same scene
gives the same pixels and the same JPEG bytes. Shapes are drawn at twice the target size and box-filtered down, which
anti-aliases their edges; every shape is mirror-symmetric about its vertical axis.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from vlmo_ds.data.synthetic.scene import Scene, SceneObject

SUPERSAMPLE = 2


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = math.radians(-90 + 36 * k)  # first point straight up: symmetric under a horizontal flip
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    t, e = 0.32 * r, 0.9 * r  # half arm thickness, arm half length
    return [
        (cx - t, cy - e), (cx + t, cy - e), (cx + t, cy - t), (cx + e, cy - t), (cx + e, cy + t), (cx + t, cy + t),
        (cx + t, cy + e), (cx - t, cy + e), (cx - t, cy + t), (cx - e, cy + t), (cx - e, cy - t), (cx - t, cy - t),
    ]  # fmt: skip


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.r * side
    fill = tuple(obj.rgb)
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        h = 0.8 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        w = r * math.sqrt(3) / 2  # apex up, centroid at the object's centre
        draw.polygon([(cx, cy - r), (cx + w, cy + r / 2), (cx - w, cy + r / 2)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fill)
    elif obj.shape == "cross":
        draw.polygon(_cross(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r} in a synthetic scene")


def _background(scene: Scene, size: int) -> np.ndarray:
    """[size, size, 3] uint8: a grey tinted plane, plain, with light noise, or with a light gradient."""
    bg = scene.background
    base = np.array([bg["gray"] + t for t in bg["tint"]], dtype=np.float32)
    pixels = np.broadcast_to(base, (size, size, 3)).copy()
    texture_rng = np.random.default_rng(bg["seed"])
    if bg["texture"] == "noise":
        pixels += texture_rng.normal(0.0, 6.0, (size, size, 1)).astype(np.float32)
    elif bg["texture"] == "gradient":
        ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32) * texture_rng.uniform(8.0, 20.0)
        pixels += ramp[:, None, None] if texture_rng.random() < 0.5 else ramp[None, :, None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as a size x size RGB image."""
    side = size * SUPERSAMPLE
    image = Image.fromarray(_background(scene, size), "RGB").resize((side, side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, side)
    return image.resize((size, size), Image.Resampling.BOX)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """JPEG bytes with full-resolution colour (no chroma subsampling: the small shapes keep their colours)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()
