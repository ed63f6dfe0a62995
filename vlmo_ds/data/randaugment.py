"""RandAugment as VLMo trains with it, on uint8 NumPy images [H, W, 3].

The published training transform (``square_transform_randaug``, taken from ALBEF) applies, after the random crop and
flip, ``num_ops = 2`` operations drawn with replacement from ten; each is applied with probability 0.5 at magnitude 7
on a scale whose top level is 10. The argument each op gets at magnitude m:

    op            argument                         at m = 7   sign
    Identity      -
    AutoContrast  -
    Equalize      -
    Brightness    factor m/10 * 1.8 + 0.1          1.36       fixed: always brighter
    Sharpness     factor m/10 * 1.8 + 0.1          1.36       fixed: always sharper
    ShearX/Y      shear m/10 * 0.3                 0.21       random
    TranslateX/Y  m/10 * 10 pixels (absolute)      7 px       random
    Rotate        m/10 * 30 degrees                21 deg     random

The published code defines Color, Contrast, Solarize and Posterize too, but VLMo's transform does not use them, so they
are left out here; it has no Invert. Geometric ops fill uncovered pixels with grey 128 and reproduce the fixed-point
bilinear arithmetic of OpenCV's ``warpAffine`` (pixel centres on integer coordinates, 1/32-pixel positions, 15-bit
weights), which the published code calls, so no OpenCV is needed. Where the published code overflows uint8 we clip as
PIL does (see ``autocontrast`` and ``sharpness``).

Every random draw comes from the ``numpy.random.Generator`` passed in, so a data loader that restores its generator
replays the same augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

MAX_LEVEL = 10.0
TRANSLATE_PIXELS_AT_MAX = 10.0
FILL = (128, 128, 128)

VLMO_RANDAUG_OPS: tuple[str, ...] = (
    "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)


def autocontrast(image: np.ndarray) -> np.ndarray:
    """Stretch each channel so that its minimum maps to 0 and its maximum to 255 (PIL's ``autocontrast``, cutoff 0).

    The published code negates the channel minimum as a uint8 scalar, which wraps around and turns every channel whose
    minimum is above 0 into plain 255; we follow the intended PIL behaviour instead.
    """
    out = np.empty_like(image)
    for c in range(image.shape[2]):
        channel = image[:, :, c]
        low, high = int(channel.min()), int(channel.max())
        if high <= low:
            out[:, :, c] = channel
            continue
        scale = 255.0 / (high - low)
        table = np.clip(np.arange(256) * scale - low * scale, 0, 255).astype(np.uint8)
        out[:, :, c] = table[channel]
    return out


def equalize(image: np.ndarray) -> np.ndarray:
    """Histogram-equalise each channel with PIL's lookup table (not OpenCV's ``equalizeHist``, which differs)."""
    out = np.empty_like(image)
    for c in range(image.shape[2]):
        channel = image[:, :, c]
        hist = np.bincount(channel.ravel(), minlength=256)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            out[:, :, c] = channel
            continue
        # Bin b maps to (step // 2 + pixels below b) // step: the centre of its cumulative range.
        below = np.concatenate(([step // 2], hist[:-1])).cumsum()
        table = np.clip(below // step, 0, 255).astype(np.uint8)
        out[:, :, c] = table[channel]
    return out


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Scale intensities by ``factor`` in float32, clip and truncate (as the published lookup table and PIL do)."""
    table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
    return table[image]


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend the image with its 3x3 smoothed copy (kernel 1 1 1 / 1 5 1 / 1 1 1, sum 13); the border row and column
    stay as they are. ``factor`` 1 is the identity, above 1 sharpens.

    The published code casts the blend to uint8 without clipping, so overshoots wrap around (a bright pixel next to a
    dark one turns dark); we clip to [0, 255] as PIL's ``ImageEnhance.Sharpness`` does.
    """
    height, width = image.shape[:2]
    if height < 3 or width < 3:
        return image.copy()
    pixels = image.astype(np.int32)
    total = 4 * pixels[1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + pixels[dy:dy + height - 2, dx:dx + width - 2]
    # round(total / 13): an integer over 13 is never exactly halfway, so this equals OpenCV's rounded float filter.
    smooth = ((2 * total + 13) // 26).astype(np.float32)
    out = image.astype(np.float32)
    out[1:-1, 1:-1] = smooth + np.float32(factor) * (out[1:-1, 1:-1] - smooth)
    return np.clip(out, 0, 255).astype(np.uint8)


def _warp_affine(image: np.ndarray, forward: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """Map source to output through the 2x3 ``forward`` matrix with OpenCV ``warpAffine``'s bilinear fixed point.

    Output pixel (x, y) samples the source at forward^-1 (x, y), with pixel centres on integer coordinates. Positions
    are quantised to 1/32 pixel (via 1/1024 steps, as OpenCV does), so the four bilinear weights are exact multiples of
    1/1024 and the sum is rounded half up; neighbours outside the image take the ``fill`` value.
    """
    height, width = image.shape[:2]
    m = forward.astype(np.float64)
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    inv_det = 1.0 / det if det != 0 else 0.0
    a, b, d, e = m[1, 1] * inv_det, -m[0, 1] * inv_det, -m[1, 0] * inv_det, m[0, 0] * inv_det
    c = -a * m[0, 2] - b * m[1, 2]
    f = -d * m[0, 2] - e * m[1, 2]

    xs = np.arange(width, dtype=np.float64)
    ys = np.arange(height, dtype=np.float64)
    # Source positions in 1/32 pixel: [H, W] int64.
    sx = (np.rint((b * ys + c) * 1024).astype(np.int64)[:, None] + 16
          + np.rint(a * xs * 1024).astype(np.int64)[None, :]) >> 5
    sy = (np.rint((e * ys + f) * 1024).astype(np.int64)[:, None] + 16
          + np.rint(d * xs * 1024).astype(np.int64)[None, :]) >> 5
    ix, ax = sx >> 5, (sx & 31).astype(np.int32)
    iy, ay = sy >> 5, (sy & 31).astype(np.int32)
    outside = (ix < -1) | (ix >= width) | (iy < -1) | (iy >= height)

    # Pad one pixel of fill on each side so a neighbour just off the image reads the fill.
    padded = np.empty((height + 2, width + 2, image.shape[2]), dtype=np.int32)
    padded[...] = np.asarray(fill, dtype=np.int32)
    padded[1:-1, 1:-1] = image
    flat = padded.reshape(-1, image.shape[2])
    row = np.clip(iy, -1, height - 1) + 1
    col = np.clip(ix, -1, width - 1) + 1
    top_left = row * (width + 2) + col
    below = width + 2

    # Bilinear weights in 1/1024 (OpenCV keeps them in 1/2^15, 32 times finer with the same rounding).
    wx0, wy0 = 32 - ax, 32 - ay
    acc = flat[top_left] * (wx0 * wy0)[..., None]
    acc += flat[top_left + 1] * (ax * wy0)[..., None]
    acc += flat[top_left + below] * (wx0 * ay)[..., None]
    acc += flat[top_left + below + 1] * (ax * ay)[..., None]
    out = ((acc + 512) >> 10).astype(np.uint8)
    out[outside] = np.asarray(fill, dtype=np.uint8)
    return out


def shear_x(image: np.ndarray, shear: float, fill: Sequence[int] = FILL) -> np.ndarray:
    """Shear along x about the top-left corner: output (x, y) reads source (x - shear * y, y)."""
    forward = np.array([[1, np.float32(shear), 0], [0, 1, 0]], dtype=np.float64)
    return _warp_affine(image, forward, fill)


def shear_y(image: np.ndarray, shear: float, fill: Sequence[int] = FILL) -> np.ndarray:
    """Shear along y about the top-left corner: output (x, y) reads source (x, y - shear * x)."""
    forward = np.array([[1, 0, 0], [np.float32(shear), 1, 0]], dtype=np.float64)
    return _warp_affine(image, forward, fill)


def translate_x(image: np.ndarray, pixels: float, fill: Sequence[int] = FILL) -> np.ndarray:
    """Output (x, y) reads source (x + pixels, y): positive ``pixels`` moves the content left."""
    forward = np.array([[1, 0, -np.float32(pixels)], [0, 1, 0]], dtype=np.float64)
    return _warp_affine(image, forward, fill)


def translate_y(image: np.ndarray, pixels: float, fill: Sequence[int] = FILL) -> np.ndarray:
    """Output (x, y) reads source (x, y + pixels): positive ``pixels`` moves the content up."""
    forward = np.array([[1, 0, 0], [0, 1, -np.float32(pixels)]], dtype=np.float64)
    return _warp_affine(image, forward, fill)


def rotate(image: np.ndarray, degrees: float, fill: Sequence[int] = FILL) -> np.ndarray:
    """Rotate counter-clockwise by ``degrees`` about (W/2, H/2), OpenCV's ``getRotationMatrix2D`` centre (half a
    pixel right of and below the true centre (W-1)/2, (H-1)/2, as in the published code)."""
    height, width = image.shape[:2]
    cx, cy = width / 2.0, height / 2.0
    alpha, beta = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    forward = np.array([[alpha, beta, (1 - alpha) * cx - beta * cy],
                        [-beta, alpha, beta * cx + (1 - alpha) * cy]], dtype=np.float64)
    return _warp_affine(image, forward, fill)


def _enhance_factor(magnitude: float) -> float:
    return (magnitude / MAX_LEVEL) * 1.8 + 0.1


# name -> (function of image and argument, argument at a magnitude, whether the argument's sign is drawn at random)
_OPS: dict[str, tuple[Callable[[np.ndarray, float], np.ndarray], Callable[[float], float], bool]] = {
    "Identity": (lambda image, _: image, lambda m: 0.0, False),
    "AutoContrast": (lambda image, _: autocontrast(image), lambda m: 0.0, False),
    "Equalize": (lambda image, _: equalize(image), lambda m: 0.0, False),
    "Brightness": (brightness, _enhance_factor, False),
    "Sharpness": (sharpness, _enhance_factor, False),
    "ShearX": (shear_x, lambda m: (m / MAX_LEVEL) * 0.3, True),
    "ShearY": (shear_y, lambda m: (m / MAX_LEVEL) * 0.3, True),
    "TranslateX": (translate_x, lambda m: (m / MAX_LEVEL) * TRANSLATE_PIXELS_AT_MAX, True),
    "TranslateY": (translate_y, lambda m: (m / MAX_LEVEL) * TRANSLATE_PIXELS_AT_MAX, True),
    "Rotate": (rotate, lambda m: (m / MAX_LEVEL) * 30.0, True),
}


def apply_op(name: str, image: np.ndarray, argument: float) -> np.ndarray:
    """Apply the op ``name`` (one of ``VLMO_RANDAUG_OPS``) with an explicit argument; argument-free ops ignore it."""
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; choose from {', '.join(_OPS)}")
    return _OPS[name][0](image, argument)


class RandAugment:
    """Draw ``num_ops`` ops with replacement; apply each with probability ``prob`` at ``magnitude`` (0 to 10).

    Call with a uint8 array [H, W, 3] and a generator; returns a uint8 array of the same shape.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 7.0, prob: float = 0.5,
                 ops: Sequence[str] = VLMO_RANDAUG_OPS) -> None:
        unknown = [name for name in ops if name not in _OPS]
        if unknown or not ops:
            raise ValueError(f"RandAugment ops must be a non-empty subset of {', '.join(_OPS)}; got {list(ops)}")
        if num_ops < 0:
            raise ValueError(f"RandAugment num_ops must be >= 0, got {num_ops}")
        if not 0.0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"RandAugment magnitude must lie in [0, {MAX_LEVEL:g}], got {magnitude}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandAugment prob must lie in [0, 1], got {prob}")
        self.num_ops, self.magnitude, self.prob, self.ops = num_ops, float(magnitude), float(prob), tuple(ops)

    def sample(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        """The ops to apply, in order, with their arguments (the published order of draws: the op names first, then
        per op whether to apply it and, if applied, the sign of its argument)."""
        picks = rng.integers(0, len(self.ops), size=self.num_ops)
        plan = []
        for index in picks:
            name = self.ops[int(index)]
            if rng.random() >= self.prob:
                continue
            _, to_argument, signed = _OPS[name]
            argument = to_argument(self.magnitude)
            if signed and rng.random() < 0.5:
                argument = -argument
            plan.append((name, argument))
        return plan

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"RandAugment takes a uint8 RGB array [H, W, 3], got {image.dtype} {image.shape}")
        for name, argument in self.sample(rng):
            image = apply_op(name, image, argument)
        return image
