"""The pretraining input pipeline (nfdet.classification.transforms) against DeepMind's
(docs/reference.md "Input pipeline", "Eval transform"): the Inception crop and its fallback, the
unclamped bicubic resize, the squash eval transform, and the F3 pipeline on natural-looking
images. Expectations come from PIL or restated formulas, not from the code under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nfdet.classification import build_dataset
from nfdet.classification.config import load_pretrain_cfg
from nfdet.classification.data import build_train_loader
from nfdet.classification.transforms import (
    SquashResizeCrop,
    TrainImageTransform,
    build_test_transform,
    build_train_collate,
    build_train_transform,
    sample_inception_crop,
)
from nfdet.data.synthetic import CATEGORIES, SyntheticDataParams, render_classification_image


def _pil_bicubic(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL's float bicubic resize (Keys a = -0.5, filtered when shrinking), per channel, CHW."""
    return np.stack([
        np.asarray(Image.fromarray(array[..., c].astype(np.float32), mode="F")
                   .resize((size[1], size[0]), Image.BICUBIC))
        for c in range(array.shape[-1])
    ])


def test_inception_crop_ranges():
    """TF's sample_distorted_bounding_box with DeepMind's arguments: crops inside the image,
    covering at least 10 % of it (min_object_covered 0.1, above the 0.08 area floor), aspect
    ratio in [3/4, 4/3] up to the rounding of the width, sizes spread over the range."""
    rng = np.random.default_rng(0)
    h, w = 300, 400
    areas, aspects = [], []
    for _ in range(2000):
        y, x, ch, cw = sample_inception_crop(h, w, rng)
        assert 0 <= y and y + ch <= h and 0 <= x and x + cw <= w
        areas.append(ch * cw / (h * w))
        aspects.append(cw / ch)
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.1 and areas.max() <= 1.0
    assert areas.min() < 0.15 and areas.max() > 0.9 and 0.3 < np.median(areas) < 0.7
    assert aspects.min() >= 0.75 - 1 / 40 and aspects.max() <= 4 / 3 + 1 / 40


def test_fallback_is_the_padded_center_crop():
    """When the crop comes back as the whole image, DeepMind takes a center crop of side
    S * min(H, W) / (S + 32) instead (here forced with area and aspect ranges of exactly 1)."""
    t = TrainImageTransform(64, area_range=(1.0, 1.0), aspect_range=(1.0, 1.0), hflip=False)
    # 64 * 100 / 96 = 66.7
    assert t.crop_box(100, 100, np.random.default_rng(0)) == (17, 17, 66, 66)
    assert t.crop_box(90, 150, np.random.default_rng(0)) == (15, 45, 60, 60)  # 64 * 90 / 96 = 60
    # A crop that is not the whole image is kept.
    t = TrainImageTransform(64, area_range=(0.4, 0.6), aspect_range=(1.0, 1.0), hflip=False)
    for seed in range(20):
        y, x, h, w = t.crop_box(100, 100, np.random.default_rng(seed))
        assert h == w and 0.4 <= h * w / 1e4 <= 0.6
    # No crop of exactly half the area exists at aspect 1 (71^2 and 70^2 miss 5000): every
    # attempt fails, the whole image comes back, and the fallback replaces it (TF's rounding).
    t = TrainImageTransform(64, area_range=(0.5, 0.5), aspect_range=(1.0, 1.0), hflip=False)
    assert t.crop_box(100, 100, np.random.default_rng(0)) == (17, 17, 66, 66)


def test_train_image_stage_is_crop_flip_unclamped_bicubic():
    """Fallback crop, flip, then a float bicubic resize that keeps its overshoot beyond [0, 255]
    (DeepMind's resize is not clamped), equal to PIL's float bicubic resize of the crop."""
    checker = (np.indices((100, 100)).sum(0) // 5 % 2 * 255).astype(np.uint8)
    array = np.stack([checker, 255 - checker, checker // 2], axis=-1)
    image = Image.fromarray(array)
    t = TrainImageTransform(40, area_range=(1.0, 1.0), aspect_range=(1.0, 1.0), hflip=True)
    side = int(40 * 100 / 72)  # the fallback's S * min(H, W) / (S + 32)
    off = (100 - side + 1) // 2
    crop = array[off:off + side, off:off + side]
    expected = _pil_bicubic(crop, (40, 40))
    flipped = _pil_bicubic(crop[:, ::-1], (40, 40))
    seen = set()
    for seed in range(12):
        out = t(image, seed)
        assert out.dtype == torch.float32 and out.shape == (3, 40, 40)
        if np.allclose(out.numpy(), expected, atol=0.05):
            seen.add("plain")
        else:
            np.testing.assert_allclose(out.numpy(), flipped, atol=0.05)
            seen.add("flipped")
        assert out.min() < 0 and out.max() > 255  # not clamped
        assert torch.equal(t(image, seed), out)  # seeded
    assert seen == {"plain", "flipped"}


def test_eval_squash_resize_crop_is_deepminds_resize_crop_32():
    """Whole image to (S + 32)^2 regardless of its aspect, then the center S crop at offset 16."""
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)
    out = SquashResizeCrop(32, 32)(Image.fromarray(array))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    big = _pil_bicubic(array, (64, 64))
    expected = np.clip(np.round(big[:, 16:48, 16:48]), 0, 255)
    assert np.abs(out.numpy().astype(float) - expected).max() <= 1.0
    # The shorter-side variant keeps the aspect ratio: another picture of the same image.
    cfg = load_pretrain_cfg("nfnet_f0_imagenet", ["INPUT.TEST_SIZE", "32",
                                                  "INPUT.TEST_RESIZE", "shorter_side"])
    other = build_test_transform(cfg)(Image.fromarray(array))
    assert other.shape == (3, 32, 32) and not torch.equal(other, out)
    cfg.INPUT.TEST_RESIZE = "squash"
    assert torch.equal(build_test_transform(cfg)(Image.fromarray(array)), out)


# ------------------------------------------------------------------- the F3 pipeline, end to end
def _natural_folder(root, per_class: int = 24, size: int = 96):
    """Drawn shapes on textured backgrounds (nfdet.data.synthetic), 4 classes."""
    params = SyntheticDataParams()
    for c, name in enumerate(CATEGORIES):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            image = render_classification_image(np.random.default_rng([5, c, i]), c, size, params)
            Image.fromarray(image).save(root / "train" / name / f"{i}.png")
    return root


def _flat(images: torch.Tensor) -> torch.Tensor:
    """Per image: every pixel equal to the first one (in every channel)."""
    return (images == images[:, :, :1, :1]).flatten(1).all(1)


def _pipeline_images(root, count: int, *opts: str) -> torch.Tensor:
    cfg = load_pretrain_cfg("nfnet_f3_imagenet", [
        "DATA.ROOT", str(root), "MODEL.NUM_CLASSES", str(len(CATEGORIES)),
        "SOLVER.IMS_PER_BATCH", "32", "DATA.NUM_WORKERS", "0", *opts])
    dataset = build_dataset(cfg, "train", build_train_transform(cfg))
    loader, sampler = build_train_loader(cfg, dataset, 0, 1, seed=0,
                                         collate_fn=build_train_collate(cfg))
    out, data_pass = [], 0
    while sum(len(b) for b in out) < count:
        sampler.set_epoch(data_pass)
        data_pass += 1
        out += [batch.images for batch in loader]
    return torch.cat(out)[:count]


@pytest.mark.slow
def test_f3_pipeline_does_not_blank_natural_images(tmp_path):
    """The issue's check: F3's pipeline (320 px, 4 RandAugment layers at magnitude 15, after
    MixUp/CutMix) on drawn shapes over textured backgrounds, 512 training images.

    DeepMind's own definitions do flatten a few images: Brightness x2.8 turns white an image
    none of whose pixels is below 92 (a bright crop, or one that SolarizeAdd or Solarize+Invert
    lifted above 91 first), and Posterize then keeps it flat at 252. So the check is that flat
    images are rare (3 of 512 here) and all such white saturations; never the black or gray a
    zero enhance factor gives, nor a gray fill covering the image. nfdet's earlier RandAugment
    (IMPL 'torchvision', factors 1 +- v reaching 0 at magnitude 15: 90 flat images in 512) fails
    it, as the second part shows. The size is F3's own: DeepMind's Translate (150 px) and Cutout
    (120 px) are in pixels, and at much smaller sizes they legitimately cover whole images."""
    root = _natural_folder(tmp_path / "shapes")
    images = _pipeline_images(root, 512)
    assert images.shape == (512, 3, 320, 320) and images.dtype == torch.uint8
    flat = _flat(images)
    levels = images[flat][:, :, 0, 0]
    assert flat.sum() <= 10, int(flat.sum())  # under 2 %
    assert (levels >= 248).all(), levels.tolist()  # white (Posterize: 252), never black or gray

    old = _pipeline_images(root, 128, "INPUT.RANDAUGMENT.IMPL", "torchvision")
    old_flat = _flat(old)
    old_levels = old[old_flat][:, :, 0, 0]
    assert old_flat.sum() > 10 and (old_levels < 248).any()
