"""RandAugment (nfdet.classification.randaugment) against DeepMind's definitions.

Every expectation here is restated from DeepMind's formulas (docs/reference.md "RandAugment") with
numpy or PIL, never computed by the code under test: the level-to-argument table, every op at
magnitudes 5, 10 and 15, and the policy (one of 16 ops per layer, always applied, signs only for
the geometric ops)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from nfdet.classification.randaugment import (
    RANDAUGMENT_OPS,
    OpCall,
    RandAugment,
    TorchvisionRandAugment,
    apply_op,
    level_to_arg,
)

LEVELS = (5, 10, 15)
F32 = np.float32

# DeepMind's table at m = 5, 10, 15 (docs/reference.md "RandAugment"); Solarize's threshold
# int(m / 10 * 256) wraps in uint8 (256 -> 0, 384 -> 128), which nfdet follows.
TABLE = {
    "Rotate": (15.0, 30.0, 45.0),
    "ShearX": (0.15, 0.30, 0.45),
    "ShearY": (0.15, 0.30, 0.45),
    "TranslateX": (50.0, 100.0, 150.0),
    "TranslateY": (50.0, 100.0, 150.0),
    "Color": (1.0, 1.9, 2.8),
    "Contrast": (1.0, 1.9, 2.8),
    "Brightness": (1.0, 1.9, 2.8),
    "Sharpness": (1.0, 1.9, 2.8),
    "Posterize": (2, 4, 6),
    "Solarize": (128, 0, 128),
    "SolarizeAdd": (55, 110, 165),
    "Cutout": (20, 40, 60),  # half side: squares of 40, 80, 120 px
}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _images() -> list[np.ndarray]:
    """uint8 CHW test images: full-range noise, a narrow-range (dark, low-contrast) one, a bright
    one with a gradient, and a non-square one wider than 100 px (for the pixel translations)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (3, 15, 17), dtype=np.uint8)
    narrow = rng.integers(40, 90, (3, 16, 16), dtype=np.uint8)
    ramp = np.linspace(120, 250, 14 * 18).reshape(14, 18)
    bright = np.clip(ramp[None] + rng.normal(0, 4, (3, 14, 18)), 0, 255).astype(np.uint8)
    wide = rng.integers(0, 256, (3, 24, 130), dtype=np.uint8)
    return [noise, narrow, bright, wide]


def _run(name: str, image: np.ndarray, level: int, sign: float = 1.0, center=None) -> np.ndarray:
    out = apply_op(torch.from_numpy(image.copy()), OpCall(name, sign, center), level)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    return out.numpy()


# ------------------------------------------------------------------- restated definitions
def np_blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    """DeepMind's blend: float32 ``d + f (x - d)``, truncated; clipped when extrapolating."""
    degenerate = np.broadcast_to(degenerate, image.shape)
    if factor == 0.0:
        return degenerate.copy()
    if factor == 1.0:
        return image.copy()
    d = degenerate.astype(F32)
    out = d + F32(factor) * (image.astype(F32) - d)
    if 0 < factor < 1:
        return out.astype(np.uint8)
    return np.clip(out, 0, 255).astype(np.uint8)


def np_gray(image: np.ndarray) -> np.ndarray:
    """tf.image.rgb_to_grayscale on uint8: [0, 1] floats, weights 0.2989/0.5870/0.1140, back to
    uint8 by x 255.5 and truncation."""
    x = image.astype(F32) * F32(1.0 / 255.0)
    gray = (x[0] * F32(0.2989) + x[1] * F32(0.5870)) + x[2] * F32(0.1140)
    return (gray * F32(255.5)).astype(np.uint8)


def np_autocontrast(image: np.ndarray) -> np.ndarray:
    out = image.copy()
    for c in range(3):
        lo, hi = F32(image[c].min()), F32(image[c].max())
        if hi > lo:
            scale = F32(255.0) / (hi - lo)
            out[c] = np.clip(image[c].astype(F32) * scale + (-lo * scale), 0, 255).astype(np.uint8)
    return out


def np_sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    _, h, w = image.shape
    smooth = image.copy()
    x = image.astype(np.int64)
    for y in range(1, h - 1):
        for xx in range(1, w - 1):
            window = x[:, y - 1:y + 2, xx - 1:xx + 2]
            smooth[:, y, xx] = (window.sum(axis=(1, 2)) + 4 * x[:, y, xx]) // 13
    return np_blend(smooth, image, factor)


def pil_op(image: np.ndarray, fn) -> np.ndarray:
    """Apply a PIL ImageOps function to a CHW uint8 array."""
    out = fn(Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))))
    return np.asarray(out).transpose(2, 0, 1)


def source_coords(name: str, arg: float, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each output pixel reads the input (float64), by geometry: rotation about the image
    center ((w - 1) / 2, (h - 1) / 2), shear anchored at row/column 0, translation by pixels."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    if name == "Rotate":
        t = math.radians(arg)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        return (math.cos(t) * (x - cx) - math.sin(t) * (y - cy) + cx,
                math.sin(t) * (x - cx) + math.cos(t) * (y - cy) + cy)
    if name == "ShearX":
        return x + arg * y, y
    if name == "ShearY":
        return x, y + arg * x
    if name == "TranslateX":
        return x + arg, y
    return x, y + arg  # TranslateY


def np_geometric(image: np.ndarray, name: str, arg: float) -> tuple[np.ndarray, np.ndarray]:
    """(expected image, mask of pixels whose source is not within 1e-3 of a rounding or border
    decision, where float32 vs float64 may legitimately differ)."""
    _, h, w = image.shape
    sx, sy = source_coords(name, arg, h, w)
    valid = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    ix = np.clip(np.floor(sx + 0.5), 0, w - 1).astype(int)  # nearest, ties away from 0
    iy = np.clip(np.floor(sy + 0.5), 0, h - 1).astype(int)
    out = np.where(valid[None], image[:, iy, ix], 128).astype(np.uint8)
    tol = 1e-3

    def clear(c, size):
        # Rounding ties, and coordinates on or just beside the image border.
        return ((np.abs(c - np.floor(c) - 0.5) > tol) & (np.abs(c) > tol)
                & (np.abs(c - (size - 1)) > tol))

    return out, clear(sx, w) & clear(sy, h)


# ------------------------------------------------------------------------------------ tests
def test_level_to_arg_is_deepminds_table():
    for name, values in TABLE.items():
        for level, expected in zip(LEVELS, values):
            (arg,) = level_to_arg(name, level)
            assert arg == pytest.approx(expected, abs=1e-9), (name, level)
    for name in ("AutoContrast", "Equalize", "Invert"):
        assert level_to_arg(name, 15) == ()
    # Not clipped at level 10: 15 extrapolates; enhance factors are never negated or zero.
    assert all(level_to_arg(n, m)[0] >= 1.0 for n in ("Color", "Brightness") for m in LEVELS)
    assert set(RANDAUGMENT_OPS) == set(TABLE) | {"AutoContrast", "Equalize", "Invert"}
    assert len(RANDAUGMENT_OPS) == 16 and "Identity" not in RANDAUGMENT_OPS


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", ["Color", "Contrast", "Brightness", "Sharpness"])
def test_enhance_ops(name, level):
    factor = (level / 10) * 1.8 + 0.1
    for image in _images():
        if name == "Brightness":
            expected = np_blend(np.zeros((), np.uint8), image, factor)
        elif name == "Color":
            expected = np_blend(np_gray(image)[None], image, factor)
        elif name == "Contrast":
            mean = int(np.floor(np_gray(image).mean() + 0.5))  # PIL's mean gray level
            expected = np_blend(np.full((), mean, np.uint8), image, factor)
        else:
            expected = np_sharpness(image, factor)
        out = _run(name, image, level)
        np.testing.assert_array_equal(out, expected, err_msg=f"{name} m={level}")
        if level == 5:
            np.testing.assert_array_equal(out, image)  # factor 1.0: unchanged
        else:
            assert not np.array_equal(out, image)


@pytest.mark.parametrize("level", LEVELS)
def test_contrast_pixel_count_gray_level(level):
    """DeepMind's Contrast (CONTRAST_GRAY 'pixel_count'): the gray level is H * W / 256 clipped to
    255, whatever the image."""
    factor = (level / 10) * 1.8 + 0.1
    for image in _images():
        _, h, w = image.shape
        gray = int(min(h * w / 256.0, 255.0))
        expected = np_blend(np.full((), gray, np.uint8), image, factor)
        out = apply_op(torch.from_numpy(image.copy()), OpCall("Contrast"), level,
                       contrast_gray="pixel_count")
        np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("level", LEVELS)
def test_pixel_ops(level):
    m = level / 10
    for image in _images():
        checks = {
            "AutoContrast": np_autocontrast(image),
            "Equalize": pil_op(image, ImageOps.equalize),
            "Invert": 255 - image,
            "Posterize": pil_op(image, lambda im: ImageOps.posterize(im, int(m * 4))),
            # The threshold wraps in uint8, as in DeepMind's code.
            "Solarize": pil_op(image, lambda im: ImageOps.solarize(im, int(m * 256) % 256)),
            "SolarizeAdd": np.where(
                image < 128, np.clip(image.astype(int) + int(m * 110), 0, 255), image
            ).astype(np.uint8),
        }
        for name, expected in checks.items():
            np.testing.assert_array_equal(_run(name, image, level), expected,
                                          err_msg=f"{name} m={level}")
    if level == 10:
        # Threshold 256 wraps to 0: every pixel inverted.
        image = _images()[0]
        np.testing.assert_array_equal(_run("Solarize", image, level), 255 - image)


@pytest.mark.parametrize("level", LEVELS)
def test_cutout(level):
    pad = int(level / 10 * 40)
    for image in _images():
        _, h, w = image.shape
        for center in [(0, 0), (h // 2, w // 3), (h - 1, w - 1)]:
            expected = image.copy()
            cy, cx = center
            expected[:, max(cy - pad, 0):min(cy + pad, h), max(cx - pad, 0):min(cx + pad, w)] = 128
            np.testing.assert_array_equal(_run("Cutout", image, level, center=center), expected)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_ops(name, level):
    magnitude = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateX": 100.0,
                 "TranslateY": 100.0}[name] * level / 10
    compared = total = 0
    for image in _images():
        for sign in (1.0, -1.0):
            expected, clear = np_geometric(image, name, sign * magnitude)
            out = _run(name, image, level, sign=sign)
            np.testing.assert_array_equal(out[:, clear], expected[:, clear],
                                          err_msg=f"{name} m={level} sign={sign}")
            compared += clear.sum()
            total += clear.size
    assert compared > 0.8 * total  # only pixels at a rounding tie are left out


def test_translate_is_in_absolute_pixels():
    """TranslateX at level 5 moves by 50 px whatever the width (not a share of the size)."""
    image = _images()[3]  # 130 px wide
    out = _run("TranslateX", image, 5, sign=1.0)
    np.testing.assert_array_equal(out[:, :, :80], image[:, :, 50:])
    assert (out[:, :, 80:] == 128).all()
    out = _run("TranslateX", image, 5, sign=-1.0)
    np.testing.assert_array_equal(out[:, :, 50:], image[:, :, :80])
    assert (out[:, :, :50] == 128).all()


def test_policy_draws_one_of_16_ops_per_layer_and_always_applies_it():
    ra = RandAugment(num_layers=2, magnitude=15)
    rng = np.random.default_rng(0)
    counts, signs = Counter(), {name: set() for name in GEOMETRIC}
    for _ in range(800):
        calls = ra.sample(rng, 20, 20)
        assert len(calls) == 2
        for call in calls:
            counts[call.name] += 1
            if call.name in GEOMETRIC:
                signs[call.name].add(call.sign)
            else:
                assert call.sign == 1.0
            assert (call.center is not None) == (call.name == "Cutout")
            if call.center is not None:
                assert 0 <= call.center[0] < 20 and 0 <= call.center[1] < 20
    assert set(counts) == set(RANDAUGMENT_OPS)
    # Uniform: 1600 draws, 100 expected per op; 5 standard deviations is about 48.
    assert all(50 <= c <= 150 for c in counts.values()), counts
    assert all(s == {1.0, -1.0} for s in signs.values()), signs

    # One layer: the output is exactly the drawn op applied (no probability of skipping it).
    image = torch.from_numpy(_images()[1].copy())  # narrow range: no op is a no-op on it
    one = RandAugment(num_layers=1, magnitude=10)
    changed = 0
    for seed in range(60):
        (call,) = one.sample(np.random.default_rng(seed), 16, 16)
        out = one(image, np.random.default_rng(seed))
        assert torch.equal(out, apply_op(image, call, 10)), call
        changed += not torch.equal(out, image)
    assert changed == 60  # at level 10 every op changes this image


def test_randaugment_rejects_bad_settings():
    with pytest.raises(ValueError, match="INPUT.RANDAUGMENT.MAGNITUDE"):
        RandAugment(2, -1)
    with pytest.raises(ValueError, match="INPUT.RANDAUGMENT.NUM_OPS"):
        RandAugment(-1, 5)
    with pytest.raises(ValueError, match="INPUT.RANDAUGMENT.CONTRAST_GRAY"):
        RandAugment(2, 5, contrast_gray="median")


def test_torchvision_variant_magnitude_mapping():
    """IMPL 'torchvision' keeps nfdet's earlier mapping: level m is m/10 of torchvision's maxima
    (rotate 30 degrees, shear 0.3), extrapolated past 10 for the continuous ops."""
    ra = TorchvisionRandAugment(num_ops=1, magnitude=15)
    space = ra._AUGMENTATION_SPACE
    assert space["Rotate"][0](16, 64, 64)[15].item() == pytest.approx(45.0)
    assert space["ShearX"][0](16, 64, 64)[15].item() == pytest.approx(0.45)
    assert space["Brightness"][0](16, 64, 64)[15].item() == pytest.approx(1.0)
    out = ra(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="MAGNITUDE"):
        TorchvisionRandAugment(magnitude=-1)
