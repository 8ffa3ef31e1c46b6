"""Image transforms of the pretraining recipe (torchvision.transforms.v2) and batch mixing.

Train: RandomResizedCrop (area 0.08-1, aspect 3/4-4/3, bicubic) -> horizontal flip -> RandAugment
-> uint8 CHW tensor. Eval: resize the shorter side to ``test_size + 32`` (bicubic) -> center crop.
Normalization happens on the device, on whole batches (``normalize_batch``), so workers ship
uint8 tensors (4x less data than float).

RandAugment magnitude mapping: DeepMind (the EfficientNet/TPU ``autoaugment.py`` their input
pipeline uses) gives magnitudes on a 0-10 scale, level ``m`` meaning ``m / 10`` of each op's
maximum (rotate 30 deg, shear 0.3, translate ~0.45 of the size, enhance factor +-0.9), and the
recipe uses 5, 10 and 15 (15 extrapolates to 1.5x the maxima). torchvision's ``RandAugment`` has the
same maxima at its last bin (0-30 with the default 31 bins, so ``torchvision = 3 x DeepMind``),
but cannot go beyond them. ``DeepMindRandAugment`` uses bins that are DeepMind levels 0..m and
extrapolates the continuous ops linearly as DeepMind does; posterize and solarize saturate at
level 10 (4 bits removed / threshold 0), where extrapolating would be meaningless.

MixUp/CutMix: DeepMind mixes half of every batch with MixUp (alpha 0.2) and the other half with
CutMix (alpha 1.0). torchvision's ``MixUp``/``CutMix`` pick one per batch, so ``mix_batch``
implements the half/half split with an explicit numpy generator (seeded per step).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms import v2

__all__ = [
    "DeepMindRandAugment",
    "build_train_transform",
    "build_test_transform",
    "normalize_batch",
    "mix_batch",
    "soft_targets",
]

_INTERPOLATIONS = {
    "bicubic": v2.InterpolationMode.BICUBIC,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "nearest": v2.InterpolationMode.NEAREST,
}


def _interpolation(name: str) -> v2.InterpolationMode:
    if name.lower() not in _INTERPOLATIONS:
        raise ValueError(
            f"INPUT.INTERPOLATION must be one of {sorted(_INTERPOLATIONS)}, got {name!r}"
        )
    return _INTERPOLATIONS[name.lower()]


def _linear(maximum: float):
    # Bin i is DeepMind level i: value = maximum * i / 10 (extrapolates past level 10).
    return lambda num_bins, height, width: torch.arange(num_bins) * (maximum / 10.0)


def _linear_scaled(fraction: float, axis: str):
    def fn(num_bins: int, height: int, width: int) -> torch.Tensor:
        size = width if axis == "x" else height
        return torch.arange(num_bins) * (fraction * size / 10.0)

    return fn


def _posterize(num_bins: int, height: int, width: int) -> torch.Tensor:
    levels = torch.arange(num_bins).clamp(max=10)
    return (8 - (levels * 0.4).round()).int()


def _solarize(num_bins: int, height: int, width: int) -> torch.Tensor:
    return 1.0 - torch.arange(num_bins).clamp(max=10) / 10.0


class DeepMindRandAugment(v2.RandAugment):
    """torchvision's RandAugment with magnitudes on DeepMind's 0-10(+) scale.

    Args:
        num_ops (int): ops applied per image (DeepMind's "layers").
        magnitude (int): DeepMind level (0-10 within torchvision's ranges; larger extrapolates).
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
        # Enhance factors are 1 +- value; keep them >= 0 when extrapolating.
        "Brightness": (lambda n, h, w: _linear(0.9)(n, h, w).clamp(max=1.0), True),
        "Color": (lambda n, h, w: _linear(0.9)(n, h, w).clamp(max=1.0), True),
        "Contrast": (lambda n, h, w: _linear(0.9)(n, h, w).clamp(max=1.0), True),
        "Sharpness": (lambda n, h, w: _linear(0.9)(n, h, w).clamp(max=1.0), True),
        "Posterize": (_posterize, False),
        "Solarize": (_solarize, False),
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


def build_train_transform(cfg) -> v2.Compose:
    """Per-image train transform: PIL RGB image -> augmented uint8 CHW tensor.

    Args:
        cfg (CfgNode): reads ``INPUT.*``.
    """
    inp = cfg.INPUT
    interp = _interpolation(inp.INTERPOLATION)
    ops: list = [
        v2.RandomResizedCrop(
            inp.TRAIN_SIZE,
            scale=tuple(inp.RANDOM_RESIZED_CROP.SCALE),
            ratio=tuple(inp.RANDOM_RESIZED_CROP.RATIO),
            interpolation=interp,
            antialias=True,
        )
    ]
    if inp.HFLIP:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.PILToTensor())
    if inp.RANDAUGMENT.ENABLED and inp.RANDAUGMENT.NUM_OPS > 0:
        ops.append(
            DeepMindRandAugment(
                num_ops=int(inp.RANDAUGMENT.NUM_OPS),
                magnitude=inp.RANDAUGMENT.MAGNITUDE,
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=128,
            )
        )
    return v2.Compose(ops)


def build_test_transform(cfg) -> v2.Compose:
    """Eval transform: resize the shorter side to TEST_SIZE + TEST_RESIZE_PAD, center crop."""
    inp = cfg.INPUT
    return v2.Compose(
        [
            v2.Resize(
                inp.TEST_SIZE + inp.TEST_RESIZE_PAD,
                interpolation=_interpolation(inp.INTERPOLATION),
                antialias=True,
            ),
            v2.CenterCrop(inp.TEST_SIZE),
            v2.PILToTensor(),
        ]
    )


def normalize_batch(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 NCHW -> normalized float batch: ``(x - mean) / std`` (0-255 statistics)."""
    return (images.to(dtype) - mean) / std


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label-smoothed one-hot targets: ``(1 - s) * onehot + s / num_classes``."""
    out = torch.full(
        (labels.shape[0], num_classes), smoothing / num_classes, device=labels.device
    )
    out.scatter_(1, labels[:, None], 1.0 - smoothing + smoothing / num_classes)
    return out


def _cutmix(
    x: torch.Tensor, y: torch.Tensor, lam: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
    lam_true = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the box was clipped at the border
    return x, y.lerp(y.flip(0), 1.0 - lam_true)


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    mixup_alpha: float,
    cutmix_alpha: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp on the first half of a batch and CutMix on the second (DeepMind's recipe).

    Samples are paired with the same half in reverse order. With one alpha at 0 the other
    mixing applies to the whole batch; with both at 0 the batch is returned as is.

    Args:
        images (Tensor): normalized float NCHW batch.
        targets (Tensor): soft targets (N, num_classes).
        mixup_alpha (float): MixUp coefficient ~ Beta(alpha, alpha); 0 disables MixUp.
        cutmix_alpha (float): CutMix area ~ Beta(alpha, alpha); 0 disables CutMix.
        rng (numpy.random.Generator): source of the coefficients and boxes (seeded per step by
            the trainer, so a resumed run mixes exactly as an uninterrupted one).

    Returns:
        tuple[Tensor, Tensor]: mixed images and targets.
    """
    n = images.shape[0]
    if mixup_alpha > 0 and cutmix_alpha > 0:
        half = n // 2
    else:
        half = n if mixup_alpha > 0 else 0
    out_x, out_y = [], []
    if half > 0:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        x, y = images[:half], targets[:half]
        out_x.append(x.lerp(x.flip(0), 1.0 - lam))
        out_y.append(y.lerp(y.flip(0), 1.0 - lam))
    if half < n:
        x, y = images[half:], targets[half:]
        if cutmix_alpha > 0:
            x, y = _cutmix(x, y, float(rng.beta(cutmix_alpha, cutmix_alpha)), rng)
        out_x.append(x)
        out_y.append(y)
    return torch.cat(out_x), torch.cat(out_y)
