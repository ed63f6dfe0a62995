"""Tests for vlmo_ds.data.transforms and vlmo_ds.data.randaugment: exact pixel values against hand computations and
Pillow's own operations, determinism under a seeded generator, the crop fallback and the flip."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from vlmo_ds.data import randaugment as ra
from vlmo_ds.data.transforms import (
    CROP_RATIO,
    build_image_transform,
    denormalise,
    normalise,
    random_resized_crop_box,
    to_tensor,
)

FILL = 128


def _photo(height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient with noise and a patch, values inside [20, 230]: no op is a no-op on it by accident."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 150 / width, yy * 150 / height, (xx + yy) * 75 / (width + height)], axis=-1) + 40
    image = base + rng.normal(0, 12, (height, width, 3))
    image[height // 4: height // 2, width // 4: width // 2] = [200, 60, 90]
    return np.clip(image, 20, 230).astype(np.uint8)


def _hand_normalise(pixels_hwc: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels_hwc.copy()).permute(2, 0, 1).to(torch.float32) / 255
    return (x - 0.5) / 0.5


# ---------------------------------------------------------------- evaluation transform and helpers

def test_eval_equals_bicubic_resize_then_normalise():
    image = Image.fromarray(_photo(37, 50))
    out = build_image_transform(32, train=False)(image)
    expected = _hand_normalise(np.array(image.resize((32, 32), Image.Resampling.BICUBIC)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_eval_converts_non_rgb_and_rejects_arrays():
    grey = Image.fromarray(_photo()[:, :, 0], mode="L")
    transform = build_image_transform(16, train=False)
    assert torch.equal(transform(grey), transform(grey.convert("RGB")))
    with pytest.raises(TypeError, match="PIL image"):
        transform(_photo())


def test_normalise_round_trip_and_end_points():
    x = torch.rand(2, 3, 5, 4)
    assert torch.allclose(denormalise(normalise(x)), x, atol=1e-7)
    assert torch.equal(normalise(torch.zeros(3, 1, 1)), -torch.ones(3, 1, 1))
    assert torch.equal(normalise(torch.ones(3, 1, 1)), torch.ones(3, 1, 1))
    assert torch.equal(to_tensor(Image.fromarray(_photo())), to_tensor(_photo()))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="image_size"):
        build_image_transform(0, train=True)
    with pytest.raises(ValueError, match="crop_scale"):
        build_image_transform(32, train=True, crop_scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="Generator"):
        build_image_transform(32, train=True)(Image.fromarray(_photo()))


# ---------------------------------------------------------------- training transform

def test_train_output_shape_dtype_range_and_determinism():
    image = Image.fromarray(_photo(60, 80))
    transform = build_image_transform(32, train=True)
    outs = [transform(image, np.random.default_rng(seed)) for seed in range(8)]
    for out in outs:
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
    assert torch.equal(outs[0], transform(image, np.random.default_rng(0)))
    assert not torch.equal(outs[0], outs[1])


def test_crop_fallback_is_central_and_clamped_to_ratio():
    rng = np.random.default_rng(0)
    # A 1000 x 10 strip: every try needs a box at least 61 pixels tall, so all ten fail.
    assert random_resized_crop_box(1000, 10, (0.5, 1.0), CROP_RATIO, rng) == (0, 493, 10, 13)
    assert random_resized_crop_box(10, 1000, (0.5, 1.0), CROP_RATIO, rng) == (493, 0, 13, 10)
    strip = Image.fromarray(_photo(10, 1000))
    out = build_image_transform(16, train=True, randaug=False, hflip=False)(strip, rng)
    hand = np.array(strip.crop((493, 0, 506, 10)).resize((16, 16), Image.Resampling.BICUBIC))
    assert torch.equal(out, _hand_normalise(hand))


def test_crop_boxes_stay_inside_and_respect_scale():
    for seed in range(200):
        top, left, h, w = random_resized_crop_box(64, 48, (0.5, 1.0), CROP_RATIO, np.random.default_rng(seed))
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
        assert 0.47 <= h * w / (64 * 48) <= 1.0  # the area fraction, up to rounding of the sides
    # Full-area crops of a square are the whole square (any fitting try, or the fallback).
    assert random_resized_crop_box(64, 64, (1.0, 1.0), CROP_RATIO, np.random.default_rng(3)) == (0, 0, 64, 64)


def test_flip_mirrors_the_resized_image():
    image = Image.fromarray(_photo(40, 40))
    eval_out = build_image_transform(24, train=False)(image)
    flip = build_image_transform(24, train=True, randaug=False, hflip=True, crop_scale=(1.0, 1.0))
    no_flip = build_image_transform(24, train=True, randaug=False, hflip=False, crop_scale=(1.0, 1.0))
    flipped = 0
    for seed in range(20):
        out = flip(image, np.random.default_rng(seed))
        if torch.equal(out, eval_out.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(out, eval_out)
        assert torch.equal(no_flip(image, np.random.default_rng(seed)), eval_out)
    assert 0 < flipped < 20


def test_train_transform_applies_randaugment():
    image = Image.fromarray(_photo(40, 40))
    with_aug = build_image_transform(24, train=True, crop_scale=(1.0, 1.0))
    without = build_image_transform(24, train=True, randaug=False, crop_scale=(1.0, 1.0))
    differs = [not torch.equal(with_aug(image, np.random.default_rng(s)), without(image, np.random.default_rng(s)))
               for s in range(10)]
    assert any(differs)


# ---------------------------------------------------------------- RandAugment ops

@pytest.mark.parametrize("name", [n for n in ra.VLMO_RANDAUG_OPS if n != "Identity"])
def test_each_op_changes_a_photo(name):
    image = _photo()
    plan = ra.RandAugment(num_ops=1, prob=1.0, ops=(name,)).sample(np.random.default_rng(0))
    out = ra.apply_op(name, image, plan[0][1])
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        assert not np.array_equal(ra.apply_op(name, image, -plan[0][1]), out)


def test_identity_is_identity():
    assert np.array_equal(ra.apply_op("Identity", _photo(), 0.0), _photo())


def test_arguments_at_magnitude_seven():
    expected = {"Brightness": 1.36, "Sharpness": 1.36, "ShearX": 0.21, "ShearY": 0.21,
                "TranslateX": 7.0, "TranslateY": 7.0, "Rotate": 21.0}
    for name, value in expected.items():
        augment = ra.RandAugment(num_ops=1, prob=1.0, ops=(name,))
        args = {augment.sample(np.random.default_rng(seed))[0][1] for seed in range(16)}
        signed = name not in ("Brightness", "Sharpness")
        assert {round(a, 6) for a in args} == ({value, -value} if signed else {value})


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_ops_equal_pillow(seed):
    image = _photo(seed=seed)
    pil = Image.fromarray(image)
    assert np.array_equal(ra.autocontrast(image), np.array(ImageOps.autocontrast(pil)))
    assert np.array_equal(ra.equalize(image), np.array(ImageOps.equalize(pil)))
    for factor in (1.36, 3.0):  # 3.0 overshoots [0, 255]: clipped like Pillow, not wrapped
        assert np.array_equal(ra.brightness(image, factor), np.array(ImageEnhance.Brightness(pil).enhance(factor)))
        assert np.array_equal(ra.sharpness(image, factor), np.array(ImageEnhance.Sharpness(pil).enhance(factor)))


def test_autocontrast_and_brightness_by_hand():
    image = np.array([[[50, 0, 7], [150, 255, 7]]], dtype=np.uint8)
    assert ra.autocontrast(image).tolist() == [[[0, 0, 7], [255, 255, 7]]]
    image = np.array([[[0, 100, 200]]], dtype=np.uint8)
    assert ra.brightness(image, 1.36).tolist() == [[[0, 136, 255]]]


def test_translate_moves_whole_pixels():
    image = _photo()
    out = ra.translate_x(image, 7.0)
    assert np.array_equal(out[:, :-7], image[:, 7:]) and (out[:, -7:] == FILL).all()
    out = ra.translate_x(image, -7.0)
    assert np.array_equal(out[:, 7:], image[:, :-7]) and (out[:, :7] == FILL).all()
    out = ra.translate_y(image, 7.0)
    assert np.array_equal(out[:-7], image[7:]) and (out[-7:] == FILL).all()
    assert np.array_equal(ra.translate_x(image, 0.0), image)


def test_shear_rounds_half_pixels_up_and_blends_the_fill():
    image = _photo().astype(np.int64)
    out = ra.shear_x(image.astype(np.uint8), 0.25).astype(np.int64)
    assert np.array_equal(out[0], image[0])  # shear about the top-left corner
    assert np.array_equal(out[4, 1:], image[4, :-1]) and (out[4, 0] == FILL).all()  # row 4: one whole pixel
    # Row 2 reads half a pixel to the left: the mean of two neighbours, rounded half up; the first column blends
    # the fill with the first pixel.
    assert np.array_equal(out[2, 1:], (image[2, :-1] + image[2, 1:] + 1) // 2)
    assert np.array_equal(out[2, 0], (FILL + image[2, 0] + 1) // 2)
    transposed = np.ascontiguousarray(image.astype(np.uint8).transpose(1, 0, 2))
    assert np.array_equal(ra.shear_y(transposed, 0.25), out.astype(np.uint8).transpose(1, 0, 2))


def test_rotate_is_counter_clockwise_about_opencv_centre():
    image = _photo(24, 24)
    out = ra.rotate(image, 90.0)
    # Centre (W/2, H/2) is half a pixel off the true centre: a quarter turn lands one row up, the last row is fill.
    assert np.array_equal(out[1:], np.rot90(image)[:-1]) and (out[0] == FILL).all()
    out = ra.rotate(image, 180.0)
    assert np.array_equal(out[1:, 1:], image[::-1, ::-1][:-1, :-1])


def test_randaugment_applies_its_plan_and_replays():
    image = _photo()
    augment = ra.RandAugment()
    for seed in range(6):
        plan = augment.sample(np.random.default_rng(seed))
        expected = image
        for name, argument in plan:
            expected = ra.apply_op(name, expected, argument)
        assert np.array_equal(augment(image, np.random.default_rng(seed)), expected)
    assert np.array_equal(ra.RandAugment(prob=0.0)(image, np.random.default_rng(0)), image)
    assert len(ra.RandAugment(num_ops=2, prob=1.0).sample(np.random.default_rng(0))) == 2


def test_randaugment_refuses_bad_settings():
    with pytest.raises(ValueError, match="ops"):
        ra.RandAugment(ops=("Invert",))
    with pytest.raises(ValueError, match="magnitude"):
        ra.RandAugment(magnitude=11)
    with pytest.raises(ValueError, match="uint8"):
        ra.RandAugment()(_photo().astype(np.float32), np.random.default_rng(0))
