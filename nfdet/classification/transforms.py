"""The pretraining input pipeline, in DeepMind's order (docs/pretraining_pipeline.md).

Per image, in the dataset (``TrainImageTransform``, a loader worker): decode -> Inception crop
(TF's ``sample_distorted_bounding_box``: aspect 3/4-4/3, area 0.08-1, at least 10 % of the image,
10 attempts; when the crop comes back as the whole image, a padded center crop of side
``S * min(H, W) / (S + 32)`` instead) -> random horizontal flip (uint8) -> bicubic resize to the
square train size ``S``, float, not clamped.

Per batch, in the same worker (``TrainCollate``, the loader's ``collate_fn``): ``2b`` source images
-> ``b`` training examples by MixUp/CutMix (``nfdet.classification.mixing``) -> clip to [0, 255]
and cast to uint8 -> RandAugment on each mixed image (``nfdet.classification.randaugment``) ->
a ``MixedBatch`` of uint8 images with the labels of both partners and the ratio. Normalization
(``normalize_batch``) and the soft targets (``mixing.mixed_targets``: label mixing, then label
smoothing) happen on the device.

Every random draw is seeded per sample: the crop and flip from the sample seed the sampler hands
out (``ClassificationDataset`` runs the transform under it), the pair's ratio or box and the
RandAugment ops from the seed of the pair's first image. Nothing depends on the number of workers,
and a resumed run sees the same images.

Eval (``build_test_transform``): DeepMind's ``resize_crop_32`` by default (``INPUT.TEST_RESIZE
'squash'``): resize the whole image to ``(S + 32)^2`` (bicubic, aspect not kept), center crop ``S``;
``'shorter_side'`` resizes the shorter side to ``S + 32`` instead.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from .mixing import (
    STREAM_IMAGE,
    STREAM_RANDAUGMENT,
    MixedBatch,
    mix_pairs,
    pair_indices,
    quantize,
    sample_rng,
    sources_per_example,
)
from .randaugment import RandAugment, TorchvisionRandAugment, level_to_arg

__all__ = [
    "INTERPOLATIONS",
    "sample_inception_crop",
    "padded_center_crop",
    "resize_float",
    "quantize",
    "one_thread",
    "TrainImageTransform",
    "TrainCollate",
    "SquashResizeCrop",
    "build_randaugment",
    "build_train_transform",
    "build_train_collate",
    "build_test_transform",
    "normalize_batch",
]

logger = logging.getLogger(__name__)

# INPUT.INTERPOLATION -> torch interpolate mode (bicubic and bilinear antialiased when shrinking).
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


# ----------------------------------------------------------------------------------- crops
def _tf_random_crop(height: int, width: int, min_area_frac: float, max_area_frac: float,
                    aspect: float, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """One attempt of TF's ``GenerateRandomCrop``: (y, x, h, w) or None.

    The crop height is uniform over the integers between the heights that give the minimum and
    the maximum area at this aspect ratio (lrintf rounding), the width ``round(h * aspect)``.
    """
    min_area = min_area_frac * width * height
    max_area = max_area_frac * width * height
    h = int(np.rint(math.sqrt(min_area / aspect)))
    max_h = int(np.rint(math.sqrt(max_area / aspect)))
    if np.rint(max_h * aspect) > width:
        # The largest height whose rounded width still fits.
        max_h = int((width + 0.5 - 1e-7) / aspect)
        if np.rint(max_h * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
        h += int(rng.integers(max_h - h + 1))
    w = int(np.rint(h * aspect))
    area = w * h
    # Rounding may have left the area range: one step up, then one step down.
    if area < min_area:
        h += 1
        w = int(np.rint(h * aspect))
        area = w * h
    if area > max_area:
        h -= 1
        w = int(np.rint(h * aspect))
        area = w * h
    if area < min_area or area > max_area or w > width or h > height or w <= 0 or h <= 0:
        return None
    y = int(rng.integers(height - h)) if h < height else 0
    x = int(rng.integers(width - w)) if w < width else 0
    return y, x, h, w


def sample_inception_crop(height: int, width: int, rng: np.random.Generator,
                          area_range: Sequence[float] = (0.08, 1.0),
                          aspect_range: Sequence[float] = (3 / 4, 4 / 3),
                          min_object_covered: float = 0.1,
                          max_attempts: int = 10) -> tuple[int, int, int, int]:
    """TF's ``sample_distorted_bounding_box`` with the whole image as the only box:
    ``(y, x, h, w)``; the whole image when no attempt gives a valid crop.

    Per attempt: aspect ratio uniform in ``aspect_range``, then ``_tf_random_crop``; accepted
    when the crop covers at least ``min_object_covered`` of the image (and one pixel).
    """
    lo, hi = float(aspect_range[0]), float(aspect_range[1])
    for _ in range(max_attempts):
        aspect = rng.random() * (hi - lo) + lo
        crop = _tf_random_crop(height, width, area_range[0], area_range[1], aspect, rng)
        if crop is not None:
            area = crop[2] * crop[3]
            if area >= 1 and area / (height * width) >= min_object_covered:
                return crop
    return 0, 0, height, width


def padded_center_crop(height: int, width: int, size: int,
                       pad: int = 32) -> tuple[int, int, int, int]:
    """DeepMind's center crop ``(y, x, h, w)``: square side ``size * min(H, W) / (size + pad)``
    (truncated), centered (odd margins put the extra pixel first)."""
    scale = min(height / (size + pad), width / (size + pad))
    side_h = max(1, int(scale * size))
    side_w = max(1, int(scale * size))
    return (height - side_h + 1) // 2, (width - side_w + 1) // 2, side_h, side_w


# --------------------------------------------------------------------------------- helpers
def resize_float(image: torch.Tensor, size: tuple[int, int],
                 interpolation: str = "bicubic") -> torch.Tensor:
    """Resize a float (C, H, W) image; no clamping (bicubic overshoots [0, 255] as DeepMind's).

    Bicubic and bilinear use torch's antialiased kernels (bicubic with a = -0.5, PIL's and TF's
    Keys kernel), which filter when shrinking.
    """
    if image.shape[-2:] == tuple(size):
        return image
    mode = interpolation.lower()
    if mode not in INTERPOLATIONS:
        raise ValueError(f"INPUT.INTERPOLATION must be one of {INTERPOLATIONS}, got {mode!r}")
    kwargs = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
    return F.interpolate(image[None], size=tuple(size), mode=mode, **kwargs)[0]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops on one thread (loader workers already do). The pipeline's ops are small:
    in the main process (``DATA.NUM_WORKERS 0``) intra-op threads cost more than they save
    (docs/benchmarks.md, "Data loading")."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pil_to_tensor(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    return array


class _TorchvisionAugment:
    """``TorchvisionRandAugment`` behind the ``(image, rng)`` call of ``RandAugment``: torch's RNG
    is seeded from ``rng`` (in a forked RNG state)."""

    def __init__(self, augment: TorchvisionRandAugment):
        self.augment = augment

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(rng.integers(2**62)))
            return self.augment(image)

    def __repr__(self) -> str:
        return repr(self.augment)


# ------------------------------------------------------------------------------- pipeline
class TrainImageTransform:
    """Per-image train stage: PIL RGB image -> float (3, S, S) tensor (not clamped).

    ``transform(image, seed)`` draws from ``seed`` (``ClassificationDataset`` passes the sample
    seed); ``transform(image)`` draws a seed from torch's RNG.

    Args:
        size (int): square train size S.
        area_range, aspect_range, min_object_covered, max_attempts: the Inception crop's.
        fallback_pad (int): the fallback center crop keeps ``S / (S + pad)`` of the shorter side.
        hflip (bool): random horizontal flip (p 0.5).
        interpolation (str): "bicubic", "bilinear" or "nearest".
        augment (callable | None): ``(uint8 image, rng) -> uint8 image`` applied here, before
            mixing (``INPUT.AUGMENT_BEFORE_MIX``); None: RandAugment runs after mixing.
    """

    def __init__(self, size: int, area_range: Sequence[float] = (0.08, 1.0),
                 aspect_range: Sequence[float] = (3 / 4, 4 / 3),
                 min_object_covered: float = 0.1, max_attempts: int = 10,
                 fallback_pad: int = 32, hflip: bool = True, interpolation: str = "bicubic",
                 augment: Callable | None = None):
        self.size = int(size)
        self.area_range = tuple(float(v) for v in area_range)
        self.aspect_range = tuple(float(v) for v in aspect_range)
        self.min_object_covered = float(min_object_covered)
        self.max_attempts = int(max_attempts)
        self.fallback_pad = int(fallback_pad)
        self.hflip = bool(hflip)
        self.interpolation = interpolation
        self.augment = augment

    def crop_box(self, height: int, width: int,
                 rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The crop ``(y, x, h, w)`` of an image: the Inception crop, or the padded center crop
        when that came back as the whole image."""
        box = sample_inception_crop(height, width, rng, self.area_range, self.aspect_range,
                                    self.min_object_covered, self.max_attempts)
        if box[2:] == (height, width):
            box = padded_center_crop(height, width, self.size, self.fallback_pad)
        return box

    # ClassificationDataset hands this transform the sample seed.
    takes_seed = True

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        with one_thread():
            return self._transform(image, sample_rng(seed, STREAM_IMAGE))

    def _transform(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        array = _pil_to_tensor(image)
        y, x, h, w = self.crop_box(array.shape[0], array.shape[1], rng)
        crop = array[y:y + h, x:x + w]
        if self.hflip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        tensor = torch.from_numpy(np.require(crop, requirements=["C", "W"])).permute(2, 0, 1)
        out = resize_float(tensor.to(torch.float32), (self.size, self.size), self.interpolation)
        if self.augment is not None:
            out = self.augment(quantize(out, truncate=True), rng).to(torch.float32)
        return out


class TrainCollate:
    """Per-batch train stage (a DataLoader ``collate_fn``): samples ``(float image, label,
    seed)`` -> ``MixedBatch`` of uint8 images (see the module docstring).

    Args:
        mixup_alpha (float): 0 turns MixUp off.
        cutmix_alpha (float): 0 turns CutMix off.
        augment (callable | None): ``(uint8 image, rng) -> uint8 image`` on each mixed image
            (RandAugment after mixing), seeded from the pair's first sample; None: none here.
        truncate (bool): quantize by truncation (DeepMind's cast before RandAugment) rather than
            rounding; set when RandAugment follows.
    """

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 augment: Callable | None = None, truncate: bool | None = None):
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.augment = augment
        self.truncate = augment is not None if truncate is None else truncate

    @property
    def sources_per_example(self) -> int:
        return sources_per_example(self.mixup_alpha, self.cutmix_alpha)

    def __call__(self, samples: Sequence[tuple[torch.Tensor, int, int]]) -> MixedBatch:
        with one_thread():
            return self._collate(samples)

    def _collate(self, samples: Sequence[tuple[torch.Tensor, int, int]]) -> MixedBatch:
        images = [s[0].to(torch.float32) for s in samples]
        labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        seeds = [int(s[2]) for s in samples]
        batch = mix_pairs(images, labels, seeds, self.mixup_alpha, self.cutmix_alpha,
                          quantize_to="truncate" if self.truncate else "round")
        if self.augment is not None:
            # Each example's ops come from the seed of its first image.
            pairs = pair_indices(len(samples), self.mixup_alpha, self.cutmix_alpha)
            for i, (a, _, _) in enumerate(pairs):
                batch.images[i] = self.augment(batch.images[i],
                                               sample_rng(seeds[a], STREAM_RANDAUGMENT))
        return batch


class SquashResizeCrop:
    """DeepMind's ``resize_crop_32`` eval transform: PIL image -> uint8 (3, S, S).

    Resize the whole image to ``(S + pad)^2`` (aspect not kept), center crop ``S`` at offset
    ``(pad + 1) // 2``; the float result is rounded to uint8.

    Args:
        size (int): S.
        pad (int): 32 in DeepMind's eval.
        interpolation (str): "bicubic", "bilinear" or "nearest".
    """

    def __init__(self, size: int, pad: int = 32, interpolation: str = "bicubic"):
        self.size, self.pad, self.interpolation = int(size), int(pad), interpolation

    def __call__(self, image: Image.Image) -> torch.Tensor:
        tensor = torch.from_numpy(_pil_to_tensor(image).copy()).permute(2, 0, 1)
        big = self.size + self.pad
        with one_thread():
            out = resize_float(tensor.to(torch.float32), (big, big), self.interpolation)
        off = (self.pad + 1) // 2
        return quantize(out[:, off:off + self.size, off:off + self.size], truncate=False)


# -------------------------------------------------------------------------------- builders
def build_randaugment(cfg) -> Callable | None:
    """The ``(uint8 image, rng) -> uint8 image`` RandAugment of ``cfg.INPUT.RANDAUGMENT``, or
    None when it is off."""
    ra = cfg.INPUT.RANDAUGMENT
    if not ra.ENABLED or ra.NUM_OPS == 0:
        return None
    impl = ra.IMPL.lower()
    if impl == "deepmind":
        augment = RandAugment(int(ra.NUM_OPS), ra.MAGNITUDE, ra.CONTRAST_GRAY)
        # Translate and Cutout are in pixels: on small images they can cover the whole image.
        (shift,), (half,) = level_to_arg("TranslateX", ra.MAGNITUDE), level_to_arg("Cutout",
                                                                                   ra.MAGNITUDE)
        size = cfg.INPUT.TRAIN_SIZE
        if size <= max(shift, 2 * half):
            logger.warning(
                "RandAugment at magnitude %g translates by %g px and cuts out %d px squares "
                "(DeepMind's pixel arguments): at INPUT.TRAIN_SIZE %d some images become flat "
                "gray 128", ra.MAGNITUDE, shift, 2 * half, size)
        return augment
    if impl == "torchvision":
        return _TorchvisionAugment(TorchvisionRandAugment(
            num_ops=int(ra.NUM_OPS), magnitude=ra.MAGNITUDE,
            interpolation=v2.InterpolationMode.BILINEAR, fill=128,
        ))
    raise ValueError(
        f"INPUT.RANDAUGMENT.IMPL must be 'deepmind' or 'torchvision', got {ra.IMPL!r}"
    )


def build_train_transform(cfg) -> TrainImageTransform:
    """The per-image train stage of ``cfg.INPUT``: PIL RGB image -> float (3, S, S).

    Args:
        cfg (CfgNode): reads ``INPUT.*``.
    """
    inp = cfg.INPUT
    crop = inp.RANDOM_RESIZED_CROP
    return TrainImageTransform(
        inp.TRAIN_SIZE,
        area_range=crop.SCALE,
        aspect_range=crop.RATIO,
        min_object_covered=crop.MIN_OBJECT_COVERED,
        max_attempts=crop.MAX_ATTEMPTS,
        fallback_pad=crop.FALLBACK_PAD,
        hflip=inp.HFLIP,
        interpolation=inp.INTERPOLATION,
        augment=build_randaugment(cfg) if inp.AUGMENT_BEFORE_MIX else None,
    )


def build_train_collate(cfg) -> TrainCollate:
    """The per-batch train stage of ``cfg.INPUT`` (mixing, then RandAugment unless
    ``INPUT.AUGMENT_BEFORE_MIX``)."""
    inp = cfg.INPUT
    return TrainCollate(
        inp.MIXUP_ALPHA, inp.CUTMIX_ALPHA,
        augment=None if inp.AUGMENT_BEFORE_MIX else build_randaugment(cfg),
    )


def build_test_transform(cfg) -> Callable:
    """The eval transform of ``cfg.INPUT`` (``TEST_RESIZE``): PIL image -> uint8 (3, S, S)."""
    inp = cfg.INPUT
    mode = inp.TEST_RESIZE.lower()
    if mode == "squash":
        return SquashResizeCrop(inp.TEST_SIZE, inp.TEST_RESIZE_PAD, inp.INTERPOLATION)
    if mode == "shorter_side":
        interp = inp.INTERPOLATION.lower()
        if interp not in INTERPOLATIONS:
            raise ValueError(
                f"INPUT.INTERPOLATION must be one of {INTERPOLATIONS}, got {inp.INTERPOLATION!r}"
            )
        return v2.Compose([
            v2.Resize(inp.TEST_SIZE + inp.TEST_RESIZE_PAD,
                      interpolation=v2.InterpolationMode(interp), antialias=True),
            v2.CenterCrop(inp.TEST_SIZE),
            v2.PILToTensor(),
        ])
    raise ValueError(
        f"INPUT.TEST_RESIZE must be 'squash' or 'shorter_side', got {inp.TEST_RESIZE!r}"
    )


def normalize_batch(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 NCHW -> normalized float batch: ``(x - mean) / std`` (0-255 statistics)."""
    return (images.to(dtype) - mean) / std
