"""Image transforms for VLMo: the published training pipeline (random resized crop, flip, RandAugment) and the
evaluation pipeline (square resize), written with Pillow, NumPy and torch.

    train: RGB image -> random resized crop to [S, S] (area 0.5-1, aspect 3/4-4/3, bicubic) -> horizontal flip (p 0.5)
           -> RandAugment (2 ops, magnitude 7) -> float32 [3, S, S] in [0, 1] -> normalise
    eval:  RGB image -> bicubic resize to [S, S] -> float32 [3, S, S] in [0, 1] -> normalise

Normalisation uses mean = std = 0.5 per channel, so pixels lie in [-1, 1]. The crop follows torchvision's
``RandomResizedCrop`` step for step (ten tries, then a central crop), and the flip comes after the resize as there.
Every random draw comes from the ``numpy.random.Generator`` passed to the transform, in a fixed order (crop, flip,
RandAugment), so a data loader that restores its generator state replays the same images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from vlmo_ds.data.randaugment import RandAugment

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
RANDAUG_NUM_OPS = 2
RANDAUG_MAGNITUDE = 7.0


def _channel_constant(values: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(3, 1, 1)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] pixels in [0, 1] -> model input in [-1, 1] ((x - mean) / std, per channel)."""
    return (pixels - _channel_constant(IMAGE_MEAN, pixels)) / _channel_constant(IMAGE_STD, pixels)


def denormalise(pixels: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalise``: model-space [..., 3, H, W] -> pixels in [0, 1] (for MIM targets and pictures)."""
    return pixels * _channel_constant(IMAGE_STD, pixels) + _channel_constant(IMAGE_MEAN, pixels)


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image or uint8 array [H, W, 3] -> float32 tensor [3, H, W] in [0, 1] (value / 255)."""
    array = np.array(image, dtype=np.uint8)  # a writable copy: torch warns on read-only buffers
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Pick a crop box (top, left, box_height, box_width) as torchvision's ``RandomResizedCrop`` does.

    Up to ten tries draw an area fraction uniformly from ``scale`` and an aspect ratio log-uniformly from ``ratio``;
    the first box that fits is placed uniformly at random. If none fits, the central crop of the whole image clamped
    to the ratio range is used.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        box_width = int(round(math.sqrt(target_area * aspect)))
        box_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            return top, left, box_height, box_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        box_width, box_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        box_width, box_height = int(round(height * max(ratio))), height
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def _as_rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image transforms take a PIL image, got {type(image).__name__}; open files with PIL.Image.open")
    # Grey, palette, CMYK and RGBA images (alpha dropped) occur in web-crawled data; the model sees RGB.
    return image if image.mode == "RGB" else image.convert("RGB")


class ImageTransform:
    """PIL image (+ generator for the training transform) -> float32 tensor [3, image_size, image_size] in [-1, 1]."""

    def __init__(self, image_size: int, train: bool, randaug: bool = True, hflip: bool = True,
                 crop_scale: tuple[float, float] = (0.5, 1.0)) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive integer (e.g. 224), got {image_size!r}")
        low, high = (float(v) for v in crop_scale)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1 (published: (0.5, 1.0)), "
                             f"got {tuple(crop_scale)}")
        self.image_size, self.train, self.hflip, self.crop_scale = image_size, train, hflip, (low, high)
        self.randaug = RandAugment(RANDAUG_NUM_OPS, RANDAUG_MAGNITUDE) if (train and randaug) else None

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = _as_rgb(image)
        size = (self.image_size, self.image_size)
        if not self.train:
            return normalise(to_tensor(image.resize(size, Image.Resampling.BICUBIC)))
        if rng is None:
            raise ValueError("the training image transform draws its randomness from a numpy Generator: "
                             "call it as transform(image, rng) with rng = np.random.default_rng(seed)")
        top, left, box_height, box_width = random_resized_crop_box(image.width, image.height, self.crop_scale,
                                                                   CROP_RATIO, rng)
        image = image.crop((left, top, left + box_width, top + box_height)).resize(size, Image.Resampling.BICUBIC)
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.array(image, dtype=np.uint8)  # [S, S, 3]
        if self.randaug is not None:
            pixels = self.randaug(pixels, rng)
        return normalise(to_tensor(pixels))

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (f"ImageTransform({mode}, size={self.image_size}, crop_scale={self.crop_scale}, hflip={self.hflip}, "
                f"randaug={self.randaug is not None})")


def build_image_transform(image_size: int, train: bool, randaug: bool = True, hflip: bool = True,
                          crop_scale: tuple[float, float] = (0.5, 1.0)) -> ImageTransform:
    """The published VLMo transform: ``square_transform_randaug`` when ``train`` (the crop, flip and RandAugment can
    each be turned off or narrowed), ``square_transform`` (square bicubic resize) otherwise. The result is called as
    ``transform(image, rng)``; the evaluation transform ignores ``rng``."""
    return ImageTransform(image_size, train, randaug=randaug, hflip=hflip, crop_scale=crop_scale)
