"""RandAugment as DeepMind's NFNet input pipeline runs it, on uint8 CHW tensors.

DeepMind's ``autoaugment.py`` (the TF-TPU EfficientNet code; docs/reference.md "RandAugment")
defines 16 ops and the argument of each at a magnitude ``m`` (a level on a 0-10 scale that is not
clipped, so 15 extrapolates). Each of the ``num_layers`` layers draws one op uniformly (repeats
allowed) and ALWAYS applies it; only Rotate, Shear and Translate get a random sign; the geometric
ops and Cutout fill with gray 128.

| op | argument at magnitude m | m=5 | m=10 | m=15 |
|---|---|---|---|---|
| Rotate | (m/10) 30 degrees, +- | 15 | 30 | 45 |
| ShearX/Y | (m/10) 0.3, +- | 0.15 | 0.30 | 0.45 |
| TranslateX/Y | (m/10) 100 pixels, +- | 50 | 100 | 150 |
| Color, Contrast, Brightness, Sharpness | factor (m/10) 1.8 + 0.1 | 1.0 | 1.9 | 2.8 |
| Posterize | keep int((m/10) 4) bits | 2 | 4 | 6 |
| Solarize | threshold int((m/10) 256), wrapped to uint8 | 128 | 0 | 128 |
| SolarizeAdd | add int((m/10) 110) below 128 | 55 | 110 | 165 |
| Cutout | square of side 2 int((m/10) 40) | 40 | 80 | 120 |
| AutoContrast, Equalize, Invert | none | | | |

The ops follow DeepMind's TF definitions: enhance ops blend ``degenerate + f (image - degenerate)``
in float32 and truncate to uint8 (clipping to [0, 255] when extrapolating); gray is
``tf.image.rgb_to_grayscale``'s (weights 0.2989, 0.5870, 0.1140 on [0, 1] floats, back to uint8 by
x 255.5 and truncation); geometric ops are TF's projective transform with nearest sampling (the
source coordinate, in float32, rounded half away from zero; outside the image: the fill).

DeepMind's two quirks, decided (docs/pretraining_pipeline.md, "RandAugment"):

- Solarize: DeepMind's thresholds above 255 wrap in uint8 (256 -> 0: every pixel inverted at
  m 10; 384 -> 128 at m 15). nfdet follows it: ``level_to_arg`` returns the wrapped threshold.
- Contrast: DeepMind's gray level is the pixel count / 256 clipped to 255 (a histogram bug), which
  depends on the image size, not its content. nfdet uses the mean gray level (as PIL's Contrast,
  which DeepMind's code says it reproduces); ``contrast_gray="pixel_count"`` gives DeepMind's.

One exactness note: Sharpness's smoothing (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13) is computed in
integers here, where TF's float32 convolution may land one level lower at exact integers.

``TorchvisionRandAugment`` keeps nfdet's earlier torchvision-based RandAugment (14 ops with
Identity, signed enhance factors) for ``INPUT.RANDAUGMENT.IMPL 'torchvision'``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torchvision.transforms import v2

__all__ = [
    "RANDAUGMENT_OPS",
    "SIGNED_OPS",
    "FILL",
    "CONTRAST_GRAY_LEVELS",
    "OpCall",
    "level_to_arg",
    "apply_op",
    "RandAugment",
    "TorchvisionRandAugment",
    "tf_grayscale",
    "blend",
    "auto_contrast",
    "equalize",
    "invert",
    "rotate",
    "posterize",
    "solarize",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "cutout",
]

# DeepMind's op list, in its order (the uniform draw picks an index into it).
RANDAUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout",
    "SolarizeAdd",
)
# Ops whose argument is negated with probability 0.5.
SIGNED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
# Gray fill of the geometric ops and Cutout.
FILL = 128
# Contrast's degenerate gray level: "mean" (PIL's definition) or "pixel_count" (DeepMind's code).
CONTRAST_GRAY_LEVELS = ("mean", "pixel_count")

_MAX_LEVEL = 10.0
_TRANSLATE_CONST = 100.0  # pixels at level 10
_CUTOUT_CONST = 40  # half side at level 10
# tf.image.rgb_to_grayscale's weights.
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)


class OpCall(NamedTuple):
    """One RandAugment layer as drawn: the op, its sign (+1/-1; +1 for unsigned ops) and, for
    Cutout, the (row, column) of the square's center."""

    name: str
    sign: float = 1.0
    center: tuple[int, int] | None = None


# ------------------------------------------------------------------------------------ helpers
def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float -> uint8 as TF's cast: truncation toward zero (the caller keeps x in [0, 255])."""
    return x.to(torch.uint8)


def tf_grayscale(image: torch.Tensor) -> torch.Tensor:
    """``tf.image.rgb_to_grayscale`` of a uint8 (3, H, W) image, as a uint8 (H, W) image."""
    x = image.to(torch.float32) * _f32(1.0 / 255.0)
    w0, w1, w2 = (_f32(w) for w in _GRAY_WEIGHTS)
    gray = (x[0] * w0 + x[1] * w1) + x[2] * w2
    return _to_uint8(gray * _f32(255.5))


def blend(degenerate: torch.Tensor, image: torch.Tensor, factor: float) -> torch.Tensor:
    """``degenerate + factor (image - degenerate)`` in float32, truncated to uint8; clipped to
    [0, 255] when ``factor`` extrapolates (DeepMind's ``blend``).

    Args:
        degenerate (Tensor): uint8, broadcastable to ``image``.
        image (Tensor): uint8 (3, H, W).
        factor (float): 0 gives ``degenerate``, 1 gives ``image``.
    """
    if factor == 0.0:
        return degenerate.expand_as(image).clone()
    if factor == 1.0:
        return image.clone()
    d = degenerate.to(torch.float32)
    temp = d + _f32(factor) * (image.to(torch.float32) - d)
    if 0.0 < factor < 1.0:
        return _to_uint8(temp)  # interpolation stays within [0, 255]
    return _to_uint8(temp.clamp(0.0, 255.0))


_VALUES = torch.arange(256, dtype=torch.uint8)


def _apply_lut(image: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``lut[image]`` for a uint8 image and a (256,) or per-channel (C, 256) uint8 table (an
    index_select: faster than ``torch.where`` on uint8; docs/benchmarks.md, "Data loading")."""
    c, h, w = image.shape
    if lut.dim() == 1:
        return lut.index_select(0, image.reshape(-1).to(torch.int32)).view(c, h, w)
    offsets = (torch.arange(c, dtype=torch.int32) * 256).view(c, 1)
    flat = (image.reshape(c, -1).to(torch.int32) + offsets).view(-1)
    return lut.reshape(-1).index_select(0, flat).view(c, h, w)


def _projective(image: torch.Tensor, coeffs: Sequence[float], fill: int = FILL) -> torch.Tensor:
    """TF's projective transform (affine part) with nearest sampling and a constant fill.

    Output pixel (x, y) reads the input at ``(a0 x + a1 y + a2, b0 x + b1 y + b2)`` (float32),
    rounded half away from zero; a source coordinate outside [0, size - 1] gives ``fill``.

    Args:
        image (Tensor): uint8 (C, H, W).
        coeffs: (a0, a1, a2, b0, b1, b2).
        fill (int): value of the uncovered pixels (every channel).
    """
    c, h, w = image.shape
    a0, a1, a2, b0, b1, b2 = (_f32(float(v)) for v in coeffs)
    xs = torch.arange(w, dtype=torch.float32).view(1, w)
    ys = torch.arange(h, dtype=torch.float32).view(h, 1)
    src_x = (a0 * xs + a1 * ys) + a2
    src_y = (b0 * xs + b1 * ys) + b2
    valid = (src_x >= 0) & (src_x <= w - 1) & (src_y >= 0) & (src_y <= h - 1)
    # Round half away from zero (std::round) for the valid, non-negative coordinates: the
    # integer part plus (fraction >= 0.5), both exact in float32.
    src_x.clamp_(0.0, w - 1)
    src_y.clamp_(0.0, h - 1)
    ix, iy = src_x.trunc(), src_y.trunc()
    ix += (src_x - ix) >= 0.5
    iy += (src_y - iy) >= 0.5
    flat = (iy * w + ix).to(torch.long).view(-1)
    out = image.reshape(c, h * w).index_select(1, flat).view(c, h, w)
    return out.masked_fill_(~valid, fill)


def _shift(image: torch.Tensor, dx: int, dy: int, fill: int = FILL) -> torch.Tensor:
    """``_projective`` for a translation by whole pixels (the same pixels, by slicing): output
    (x, y) reads input (x + dx, y + dy)."""
    _, h, w = image.shape
    out = torch.full_like(image, fill)
    if abs(dx) < w and abs(dy) < h:
        out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
            image[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


# ---------------------------------------------------------------------------------------- ops
def auto_contrast(image: torch.Tensor) -> torch.Tensor:
    """Per channel, map [min, max] to [0, 255] (float32 ``x * scale + offset``, truncated)."""
    luts = _VALUES.repeat(image.shape[0], 1)
    values = _VALUES.to(torch.float32)
    for c in range(image.shape[0]):
        lo, hi = image[c].min().to(torch.float32), image[c].max().to(torch.float32)
        if hi > lo:
            scale = _f32(255.0) / (hi - lo)
            offset = -lo * scale
            luts[c] = _to_uint8((values * scale + offset).clamp(0.0, 255.0))
    return _apply_lut(image, luts)


def equalize(image: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalization (PIL's lookup table, as DeepMind's TF version)."""
    luts = _VALUES.repeat(image.shape[0], 1)
    for c in range(image.shape[0]):
        hist = torch.bincount(image[c].reshape(-1).to(torch.long), minlength=256)
        nonzero = hist[hist != 0]
        step = int((nonzero.sum() - nonzero[-1]).item()) // 255
        if step == 0:
            continue
        lut = (torch.cumsum(hist, 0) + step // 2) // step
        luts[c] = torch.cat([lut.new_zeros(1), lut[:-1]]).clamp(0, 255).to(torch.uint8)
    return _apply_lut(image, luts)


def invert(image: torch.Tensor) -> torch.Tensor:
    """``255 - x``."""
    return 255 - image


def rotate(image: torch.Tensor, degrees: float, fill: int = FILL) -> torch.Tensor:
    """Rotate about the image center ((W - 1) / 2, (H - 1) / 2) by ``degrees``
    (``tfa.image.rotate``'s transform)."""
    _, h, w = image.shape
    radians = _f32(degrees) * _f32(math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    x_offset = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_offset = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    coeffs = [cos.item(), -sin.item(), x_offset.item(), sin.item(), cos.item(), y_offset.item()]
    return _projective(image, coeffs, fill)


def posterize(image: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the ``bits`` high bits of every value."""
    shift = 8 - int(bits)
    if shift <= 0:
        return image.clone()
    if shift >= 8:
        return torch.zeros_like(image)
    return (image >> shift) << shift


def solarize(image: torch.Tensor, threshold: int) -> torch.Tensor:
    """Invert the values at or above ``threshold`` (``x < t ? x : 255 - x``)."""
    return _apply_lut(image, torch.where(_VALUES.to(torch.int32) < threshold, _VALUES,
                                         255 - _VALUES))


def solarize_add(image: torch.Tensor, addition: int, threshold: int = 128) -> torch.Tensor:
    """Add ``addition`` (clipped to [0, 255]) to the values below ``threshold``."""
    values = _VALUES.to(torch.int32)
    added = (values + int(addition)).clamp(0, 255).to(torch.uint8)
    return _apply_lut(image, torch.where(values < threshold, added, _VALUES))


def color(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the grayscale image (``factor`` 1: unchanged)."""
    return blend(tf_grayscale(image).unsqueeze(0), image, factor)


def contrast(image: torch.Tensor, factor: float, gray_level: str = "mean") -> torch.Tensor:
    """Blend with a flat gray image.

    Args:
        image (Tensor): uint8 (3, H, W).
        factor (float): blend factor (1: unchanged).
        gray_level (str): "mean": the mean of the grayscale image, rounded (PIL's Contrast);
            "pixel_count": DeepMind's code, ``min(H * W / 256, 255)`` truncated (its histogram
            sum divided by the number of bins).
    """
    _, h, w = image.shape
    if gray_level == "mean":
        level = int(math.floor(tf_grayscale(image).to(torch.float64).mean().item() + 0.5))
    elif gray_level == "pixel_count":
        level = int(min(h * w / 256.0, 255.0))
    else:
        raise ValueError(
            f"INPUT.RANDAUGMENT.CONTRAST_GRAY must be one of {CONTRAST_GRAY_LEVELS}, "
            f"got {gray_level!r}"
        )
    # A flat degenerate image: the blend of each value is the same everywhere, a lookup table.
    return _apply_lut(image, blend(torch.tensor(level, dtype=torch.uint8), _VALUES, factor))


def brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with black (``factor`` 1: unchanged; > 1 brighter)."""
    return _apply_lut(image, blend(torch.tensor(0, dtype=torch.uint8), _VALUES, factor))


def sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the image smoothed by [[1,1,1],[1,5,1],[1,1,1]] / 13 (truncated; the one-pixel
    border keeps its values)."""
    _, h, w = image.shape
    smooth = image.clone()
    if h >= 3 and w >= 3:
        x = image.to(torch.int32)
        total = 4 * x[:, 1:-1, 1:-1]
        for dy in range(3):
            for dx in range(3):
                total = total + x[:, dy:h - 2 + dy, dx:w - 2 + dx]
        smooth[:, 1:-1, 1:-1] = (total // 13).to(torch.uint8)
    return blend(smooth, image, factor)


def shear_x(image: torch.Tensor, level: float, fill: int = FILL) -> torch.Tensor:
    """Output (x, y) reads input (x + level y, y)."""
    return _projective(image, (1.0, level, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image: torch.Tensor, level: float, fill: int = FILL) -> torch.Tensor:
    """Output (x, y) reads input (x, level x + y)."""
    return _projective(image, (1.0, 0.0, 0.0, level, 1.0, 0.0), fill)


def translate_x(image: torch.Tensor, pixels: float, fill: int = FILL) -> torch.Tensor:
    """Output (x, y) reads input (x + pixels, y): the content moves left by ``pixels``."""
    if float(pixels).is_integer():
        return _shift(image, int(pixels), 0, fill)
    return _projective(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(image: torch.Tensor, pixels: float, fill: int = FILL) -> torch.Tensor:
    """Output (x, y) reads input (x, y + pixels): the content moves up by ``pixels``."""
    if float(pixels).is_integer():
        return _shift(image, 0, int(pixels), fill)
    return _projective(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


def cutout(image: torch.Tensor, pad_size: int, center: tuple[int, int],
           fill: int = FILL) -> torch.Tensor:
    """Fill the square of half side ``pad_size`` around ``center`` (row, column), clipped to
    the image: rows ``[max(0, cy - pad), min(H, cy + pad))``, columns likewise."""
    _, h, w = image.shape
    cy, cx = center
    out = image.clone()
    out[:, max(0, cy - pad_size):min(h, cy + pad_size),
        max(0, cx - pad_size):min(w, cx + pad_size)] = fill
    return out


# ------------------------------------------------------------------------------------- policy
def level_to_arg(name: str, magnitude: float) -> tuple:
    """The (unsigned) argument of op ``name`` at ``magnitude`` (DeepMind's table, above).

    Raises:
        KeyError: an unknown op name.
    """
    level = magnitude / _MAX_LEVEL
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (level * 30.0,)
    if name == "Posterize":
        return (int(level * 4),)
    if name == "Solarize":
        # DeepMind compares a uint8 image with int(level * 256): the threshold wraps mod 256.
        return (int(level * 256) % 256,)
    if name == "SolarizeAdd":
        return (int(level * 110),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (level * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        return (level * 0.3,)
    if name in ("TranslateX", "TranslateY"):
        return (level * _TRANSLATE_CONST,)
    if name == "Cutout":
        return (int(level * _CUTOUT_CONST),)
    raise KeyError(f"Unknown RandAugment op {name!r}; ops: {', '.join(RANDAUGMENT_OPS)}")


_OPS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate,
    "Posterize": posterize, "Solarize": solarize, "SolarizeAdd": solarize_add, "Color": color,
    "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x, "ShearY": shear_y,
    "TranslateX": translate_x, "TranslateY": translate_y,
}


def apply_op(image: torch.Tensor, call: OpCall, magnitude: float,
             contrast_gray: str = "mean") -> torch.Tensor:
    """Apply one drawn op at ``magnitude`` to a uint8 (3, H, W) image.

    Args:
        image (Tensor): uint8 (3, H, W).
        call (OpCall): the op, its sign and (Cutout) center.
        magnitude (float): the RandAugment magnitude.
        contrast_gray (str): see ``contrast``.
    """
    args = level_to_arg(call.name, magnitude)
    if call.name in SIGNED_OPS:
        args = (call.sign * args[0],)
    if call.name == "Contrast":
        return contrast(image, *args, gray_level=contrast_gray)
    if call.name == "Cutout":
        return cutout(image, *args, center=call.center)
    return _OPS[call.name](image, *args)


class RandAugment:
    """DeepMind's RandAugment: ``num_layers`` ops drawn uniformly from the 16, each applied.

    Args:
        num_layers (int): ops per image (DeepMind's "layers"; the NFNet recipe uses 4).
        magnitude (float): the shared magnitude m >= 0 (5, 10 or 15 in the recipe).
        contrast_gray (str): Contrast's gray level, "mean" or "pixel_count" (see ``contrast``).
    """

    def __init__(self, num_layers: int, magnitude: float, contrast_gray: str = "mean"):
        if not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(
                f"INPUT.RANDAUGMENT.NUM_OPS must be an integer >= 0, got {num_layers!r}"
            )
        if not isinstance(magnitude, (int, float)) or not magnitude >= 0:
            raise ValueError(f"INPUT.RANDAUGMENT.MAGNITUDE must be >= 0, got {magnitude!r}")
        if contrast_gray not in CONTRAST_GRAY_LEVELS:
            raise ValueError(
                f"INPUT.RANDAUGMENT.CONTRAST_GRAY must be one of {CONTRAST_GRAY_LEVELS}, "
                f"got {contrast_gray!r}"
            )
        self.num_layers = num_layers
        self.magnitude = float(magnitude)
        self.contrast_gray = contrast_gray

    def sample(self, rng: np.random.Generator, height: int, width: int) -> list[OpCall]:
        """Draw the ops of one image: per layer an op index, then a sign (signed ops) or a
        center (Cutout)."""
        calls = []
        for _ in range(self.num_layers):
            name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
            if name in SIGNED_OPS:
                calls.append(OpCall(name, -1.0 if rng.random() < 0.5 else 1.0))
            elif name == "Cutout":
                calls.append(OpCall(name, center=(int(rng.integers(height)),
                                                  int(rng.integers(width)))))
            else:
                calls.append(OpCall(name))
        return calls

    def apply(self, image: torch.Tensor, calls: Sequence[OpCall]) -> torch.Tensor:
        """Apply drawn ops in order."""
        for call in calls:
            image = apply_op(image, call, self.magnitude, self.contrast_gray)
        return image

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Augment a uint8 (3, H, W) image with ops drawn from ``rng``."""
        return self.apply(image, self.sample(rng, image.shape[-2], image.shape[-1]))

    def __repr__(self) -> str:
        return (f"RandAugment(num_layers={self.num_layers}, magnitude={self.magnitude:g}, "
                f"contrast_gray={self.contrast_gray!r})")


# -------------------------------------------------------------------------- torchvision variant
def _linear(maximum: float):
    # Bin i is level i: value = maximum * i / 10 (extrapolates past level 10).
    return lambda num_bins, height, width: torch.arange(num_bins) * (maximum / 10.0)


def _linear_scaled(fraction: float, axis: str):
    def fn(num_bins: int, height: int, width: int) -> torch.Tensor:
        size = width if axis == "x" else height
        return torch.arange(num_bins) * (fraction * size / 10.0)

    return fn


def _posterize_bins(num_bins: int, height: int, width: int) -> torch.Tensor:
    levels = torch.arange(num_bins).clamp(max=10)
    return (8 - (levels * 0.4).round()).int()


def _solarize_bins(num_bins: int, height: int, width: int) -> torch.Tensor:
    return 1.0 - torch.arange(num_bins).clamp(max=10) / 10.0


def _enhance_bins(num_bins: int, height: int, width: int) -> torch.Tensor:
    # Enhance factors are 1 +- value; kept >= 0 when extrapolating.
    return _linear(0.9)(num_bins, height, width).clamp(max=1.0)


class TorchvisionRandAugment(v2.RandAugment):
    """nfdet's earlier RandAugment (``INPUT.RANDAUGMENT.IMPL 'torchvision'``): torchvision's 14 ops
    (Identity included, enhance factors ``1 +- v``, translate as a share of the size) with the
    magnitude on a 0-10(+) scale, level m meaning m/10 of torchvision's maxima. Not DeepMind's
    (docs/pretraining_pipeline.md). Draws from torch's global RNG.

    Args:
        num_ops (int): ops applied per image.
        magnitude (int): level (0-10 within torchvision's ranges; larger extrapolates).
        interpolation: as ``v2.RandAugment``.
        fill: as ``v2.RandAugment``.
    """

    _AUGMENTATION_SPACE = {
        "Identity": (lambda num_bins, height, width: None, False),
        "ShearX": (_linear(0.3), True),
        "ShearY": (_linear(0.3), True),
        "TranslateX": (_linear_scaled(150.0 / 331.0, "x"), True),
        "TranslateY": (_linear_scaled(150.0 / 331.0, "y"), True),
        "Rotate": (_linear(30.0), True),
        "Brightness": (_enhance_bins, True),
        "Color": (_enhance_bins, True),
        "Contrast": (_enhance_bins, True),
        "Sharpness": (_enhance_bins, True),
        "Posterize": (_posterize_bins, False),
        "Solarize": (_solarize_bins, False),
        "AutoContrast": (lambda num_bins, height, width: None, False),
        "Equalize": (lambda num_bins, height, width: None, False),
    }

    def __init__(self, num_ops: int = 2, magnitude: int = 10, interpolation="nearest", fill=None):
        if not isinstance(magnitude, int) or magnitude < 0:
            raise ValueError(
                f"INPUT.RANDAUGMENT.MAGNITUDE must be an integer >= 0, got {magnitude!r}"
            )
        super().__init__(
            num_ops=num_ops,
            magnitude=magnitude,
            num_magnitude_bins=magnitude + 1,
            interpolation=interpolation,
            fill=fill,
        )
