"""MixUp and CutMix as DeepMind's NFNet input pipeline pairs them (docs/reference.md
"Input pipeline"; docs/pretraining_pipeline.md).

A batch of ``2b`` source images makes ``b`` training examples. With both mixings on, the first
quarter is MixUp-ed with the second (``x = r x_a + (1 - r) x_b``, ``r ~ Beta(alpha, alpha)``) and
the third quarter CutMix-ed with the fourth (a box of image ``a`` pasted over image ``b``); with
one of them on, the first half is mixed with the second. Every pair draws its own ratio or box,
from the seed of its first image, so partners are distinct examples, nothing is reused, and the
result does not depend on how batches are split among workers. The label weights are the true
pixel shares: ``y = r onehot(a) + (1 - r) onehot(b)``, with ``r`` the box's area fraction after
clipping for CutMix; label smoothing comes after (``mixed_targets``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "STREAM_IMAGE",
    "STREAM_MIX",
    "STREAM_RANDAUGMENT",
    "MixedBatch",
    "sample_rng",
    "sources_per_example",
    "cutmix_box",
    "pair_indices",
    "quantize",
    "mix_pairs",
    "mixed_targets",
]

# Independent random streams of a sample seed: default_rng([seed, stream]): the per-image stage
# (crop, flip), the pair's mixing, the example's RandAugment.
STREAM_IMAGE = 0
STREAM_MIX = 1
STREAM_RANDAUGMENT = 2


class MixedBatch(NamedTuple):
    """Training examples after pairing.

    Attributes:
        images (Tensor): (b, C, H, W) mixed images.
        labels (Tensor): (b,) label of each example's first image (train top-1 is scored on it).
        mix_labels (Tensor): (b,) label of its partner (equal to ``labels`` when not mixed).
        ratio (Tensor): (b,) float32 weight of ``labels`` (1 when not mixed).
    """

    images: torch.Tensor
    labels: torch.Tensor
    mix_labels: torch.Tensor
    ratio: torch.Tensor


def sample_rng(seed: int, stream: int) -> np.random.Generator:
    """The generator of one stream of a sample seed."""
    return np.random.default_rng([int(seed), stream])


def sources_per_example(mixup_alpha: float, cutmix_alpha: float) -> int:
    """Source images per training example: 2 when any mixing is on, else 1."""
    return 2 if mixup_alpha > 0 or cutmix_alpha > 0 else 1


def cutmix_box(height: int, width: int, rng: np.random.Generator,
               alpha: float = 1.0) -> tuple[int, int, int, int]:
    """DeepMind's CutMix box ``(y0, y1, x0, x1)`` (half-open, clipped to the image).

    Center uniform over the pixels; ``u ~ Beta(alpha, alpha)`` (DeepMind: alpha 1, i.e. uniform);
    side ratio ``sqrt(1 - u)``, sides ``int(ratio * size)``; corners ``center -+ side // 2``.
    """
    cx = int(rng.integers(width))
    cy = int(rng.integers(height))
    u = float(rng.beta(alpha, alpha))
    side = math.sqrt(1.0 - u)
    half_w, half_h = int(side * width) // 2, int(side * height) // 2
    x0, x1 = min(max(cx - half_w, 0), width), min(max(cx + half_w, 0), width)
    y0, y1 = min(max(cy - half_h, 0), height), min(max(cy + half_h, 0), height)
    return y0, y1, x0, x1


def pair_indices(num_sources: int, mixup_alpha: float,
                 cutmix_alpha: float) -> list[tuple[int, int, str]]:
    """The training examples of a batch of ``num_sources`` source images, in order, as
    ``(a, b, kind)``: source indices of the first image and of its partner, and "mixup",
    "cutmix" or "none" (then ``a == b``).

    Raises:
        ValueError: ``num_sources`` is not a multiple of 4 (both mixings) or 2 (one).
    """
    kinds = [k for k, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if alpha > 0]
    if not kinds:
        return [(i, i, "none") for i in range(num_sources)]
    parts = 2 * len(kinds)
    if num_sources % parts:
        raise ValueError(
            f"Mixing needs a multiple of {parts} source images per batch, got {num_sources} "
            f"(SOLVER.IMS_PER_BATCH / (SOLVER.ACCUM_STEPS x processes) must be a multiple of "
            f"{parts // 2})"
        )
    q = num_sources // parts
    # Block k of kind k pairs sources [2kq, 2kq + q) with [2kq + q, 2kq + 2q).
    return [(2 * k * q + i, 2 * k * q + q + i, kind) for k, kind in enumerate(kinds)
            for i in range(q)]


def quantize(images: torch.Tensor, truncate: bool) -> torch.Tensor:
    """Float images -> uint8: clip to [0, 255], then truncate (DeepMind's cast before
    RandAugment) or round (where DeepMind keeps floats: the closest uint8)."""
    images = images.clamp(0.0, 255.0)
    return (images if truncate else images.round()).to(torch.uint8)


def mix_pairs(images: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor,
              seeds: Sequence[int], mixup_alpha: float, cutmix_alpha: float,
              quantize_to: str | None = None) -> MixedBatch:
    """Pair ``2b`` source images into ``b`` training examples (see the module docstring).

    Args:
        images (Tensor or sequence[Tensor]): n float (C, H, W) source images.
        labels (Tensor): (n,) int64 labels.
        seeds (sequence[int]): (n,) sample seeds; pair (a, b) draws from ``seeds[a]``.
        mixup_alpha (float): MixUp ratio ~ Beta(alpha, alpha); 0 turns MixUp off.
        cutmix_alpha (float): CutMix area ~ Beta(alpha, alpha); 0 turns CutMix off.
        quantize_to (str | None): None: float examples; "truncate" or "round": each example
            goes through ``quantize`` as soon as it is mixed, giving a uint8 batch (no float
            batch is built).

    Returns:
        MixedBatch: ``n / 2`` examples (``n`` unchanged when both alphas are 0).

    Raises:
        ValueError: see ``pair_indices``.
    """
    n = len(images)
    pairs = pair_indices(n, mixup_alpha, cutmix_alpha)
    h, w = images[0].shape[-2:]
    dtype = torch.uint8 if quantize_to else images[0].dtype
    out = torch.empty((len(pairs), *images[0].shape), dtype=dtype)
    ratios = []
    for i, (a, b, kind) in enumerate(pairs):
        if kind == "none":
            mixed, r = images[a], 1.0
        elif kind == "mixup":
            r = float(sample_rng(seeds[a], STREAM_MIX).beta(mixup_alpha, mixup_alpha))
            mixed = r * images[a] + (1.0 - r) * images[b]
        else:
            y0, y1, x0, x1 = cutmix_box(h, w, sample_rng(seeds[a], STREAM_MIX), cutmix_alpha)
            mixed = images[b].clone()
            mixed[:, y0:y1, x0:x1] = images[a][:, y0:y1, x0:x1]
            r = (y1 - y0) * (x1 - x0) / (h * w)  # the box's true share, after clipping
        out[i] = quantize(mixed, quantize_to == "truncate") if quantize_to else mixed
        ratios.append(r)
    first = torch.tensor([a for a, _, _ in pairs])
    second = torch.tensor([b for _, b, _ in pairs])
    return MixedBatch(out, labels[first], labels[second], torch.tensor(ratios,
                                                                       dtype=torch.float32))


def mixed_targets(labels: torch.Tensor, mix_labels: torch.Tensor, ratio: torch.Tensor,
                  num_classes: int, smoothing: float) -> torch.Tensor:
    """Soft targets ``r onehot(a) + (1 - r) onehot(b)``, then label smoothing
    ``(1 - s) y + s / K`` (DeepMind's order).

    Args:
        labels, mix_labels (Tensor): (b,) int64.
        ratio (Tensor): (b,) weight of ``labels``.
        num_classes (int): K.
        smoothing (float): s.
    """
    r = ratio.to(torch.float32)[:, None]
    y = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    y.scatter_add_(1, labels[:, None], r)
    y.scatter_add_(1, mix_labels[:, None], 1.0 - r)
    return (1.0 - smoothing) * y + smoothing / num_classes
