"""MixUp/CutMix pairing (nfdet.classification.mixing) against DeepMind's pipeline
(docs/reference.md "Input pipeline"): 2b source images make b examples, quarter 1 MixUp-ed with
quarter 2 and quarter 3 CutMix-ed with quarter 4, a ratio or box per pair, label weights equal to
the true pixel shares, then label smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nfdet.classification.mixing import mix_pairs, mixed_targets, pair_indices
from nfdet.classification.transforms import TrainCollate

H, W = 12, 16


def _constant_sources(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source i is a flat image of value 10 * (i + 1) (so every pixel tells its source) with
    label i."""
    values = 10.0 * torch.arange(1, n + 1, dtype=torch.float32)
    return values.view(n, 1, 1, 1).expand(n, 3, H, W).clone(), torch.arange(n)


def test_both_mixings_pair_quarters_with_a_ratio_per_pair():
    n = 16  # 2b sources -> b = 8 examples
    images, labels = _constant_sources(n)
    seeds = list(range(1000, 1000 + n))
    out = mix_pairs(images, labels, seeds, 0.2, 1.0)
    assert out.images.shape == (8, 3, H, W)
    q = n // 4
    # Examples 0..q-1: MixUp of sources i and q + i; q..2q-1: CutMix of 2q + i and 3q + i.
    assert out.labels.tolist() == list(range(q)) + list(range(2 * q, 3 * q))
    assert out.mix_labels.tolist() == list(range(q, 2 * q)) + list(range(3 * q, 4 * q))
    # Every source used exactly once, partners distinct.
    used = out.labels.tolist() + out.mix_labels.tolist()
    assert sorted(used) == list(range(n))
    assert all(a != b for a, b in zip(out.labels.tolist(), out.mix_labels.tolist()))
    va = 10.0 * (out.labels + 1).float()
    vb = 10.0 * (out.mix_labels + 1).float()
    for i in range(q):  # MixUp: every pixel r * a + (1 - r) * b with the pair's own ratio
        r = out.ratio[i].item()
        torch.testing.assert_close(out.images[i], torch.full((3, H, W), r * va[i] + (1 - r) *
                                                             vb[i]))
    for i in range(q, 2 * q):  # CutMix: the ratio is the share of pixels coming from a
        from_a = (out.images[i] == va[i]).float().mean().item()
        from_b = (out.images[i] == vb[i]).float().mean().item()
        assert from_a + from_b == pytest.approx(1.0)
        assert out.ratio[i].item() == pytest.approx(from_a)
        box = (out.images[i, 0] == va[i]).nonzero()
        if len(box):  # the pasted region is one rectangle
            (y0, x0), (y1, x1) = box.min(0).values, box.max(0).values
            assert len(box) == (y1 - y0 + 1) * (x1 - x0 + 1)
    # Ratios are drawn per pair: all different.
    assert len(set(out.ratio.tolist())) == len(out.ratio)


def test_ratios_follow_their_distributions():
    """MixUp ratio ~ Beta(0.2, 0.2) (mass near 0 and 1, mean 1/2); CutMix box area about
    1 - U(0, 1) before clipping at the border (mean below 1/2, spread over (0, 1))."""
    n = 4 * 500
    images, labels = _constant_sources(n)
    out = mix_pairs(images, labels, list(range(n)), 0.2, 1.0)
    mixup, cutmix = out.ratio[:500].numpy(), out.ratio[500:].numpy()
    assert 0.4 < mixup.mean() < 0.6
    assert ((mixup < 0.1) | (mixup > 0.9)).mean() > 0.5  # Beta(0.2, 0.2) is U-shaped
    assert 0.2 < cutmix.mean() < 0.5 and cutmix.min() < 0.05 and cutmix.max() > 0.6


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0)])
def test_one_mixing_pairs_the_halves(mixup, cutmix):
    n = 8
    images, labels = _constant_sources(n)
    out = mix_pairs(images, labels, list(range(n)), mixup, cutmix)
    assert out.labels.tolist() == [0, 1, 2, 3] and out.mix_labels.tolist() == [4, 5, 6, 7]
    assert pair_indices(n, mixup, cutmix) == [(i, i + 4, "mixup" if mixup else "cutmix")
                                              for i in range(4)]


def test_no_mixing_keeps_every_source():
    images, labels = _constant_sources(6)
    out = mix_pairs(images, labels, list(range(6)), 0.0, 0.0)
    assert torch.equal(out.images, images) and torch.equal(out.mix_labels, labels)
    assert torch.equal(out.ratio, torch.ones(6))


def test_pairs_depend_only_on_their_own_seed():
    """A pair's ratio/box comes from its first image's seed: the same pair in another batch
    (another worker, a resumed run) mixes identically."""
    images, labels = _constant_sources(8)
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    full = mix_pairs(images, labels, seeds, 0.2, 1.0)
    again = mix_pairs(images, labels, seeds, 0.2, 1.0)
    assert torch.equal(full.images, again.images)
    other = mix_pairs(images, labels, [99] + seeds[1:], 0.2, 1.0)
    assert other.ratio[0] != full.ratio[0] and torch.equal(other.ratio[1:], full.ratio[1:])


def test_bad_source_count_names_the_keys():
    images, labels = _constant_sources(6)
    with pytest.raises(ValueError, match="multiple of 4 source images.*SOLVER.IMS_PER_BATCH"):
        mix_pairs(images, labels, list(range(6)), 0.2, 1.0)


def test_mixed_targets_mix_labels_then_smooth():
    labels, mix_labels = torch.tensor([0, 2, 1]), torch.tensor([3, 2, 0])
    ratio = torch.tensor([0.25, 0.6, 1.0])
    y = mixed_targets(labels, mix_labels, ratio, num_classes=4, smoothing=0.1)
    expected = np.full((3, 4), 0.1 / 4)
    expected[0, 0] += 0.9 * 0.25
    expected[0, 3] += 0.9 * 0.75
    expected[1, 2] += 0.9 * 1.0  # both partners of class 2
    expected[2, 1] += 0.9
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-6)
    assert torch.allclose(y.sum(1), torch.ones(3))


def test_collate_consumes_two_sources_per_example_and_augments_the_mixed_images():
    """The batch stage: 2b float sources -> b uint8 examples; RandAugment (here a recorder) sees
    the mixed, clipped, truncated images, one call per example, seeded by its first image."""
    seen = []

    def record(image, rng):
        seen.append((image.clone(), rng.integers(1 << 30)))
        return image

    n = 8
    images, labels = _constant_sources(n)
    images[0] += 300.0  # beyond 255: clipped before the cast
    samples = [(images[i], int(labels[i]), 100 + i) for i in range(n)]
    collate = TrainCollate(0.2, 1.0, augment=record)
    assert collate.sources_per_example == 2
    batch = collate(samples)
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 3, H, W)
    mixed = mix_pairs(images, labels, [100 + i for i in range(n)], 0.2, 1.0).images
    expected = mixed.clamp(0, 255).to(torch.uint8)  # truncation, as DeepMind's cast
    assert torch.equal(batch.images, expected)
    assert len(seen) == 4 and all(torch.equal(s, e) for (s, _), e in zip(seen, expected))
    # Seeded by the pair's first image: the same draws again in another batch.
    seen_first = [d for _, d in seen]
    seen.clear()
    collate(samples)
    assert [d for _, d in seen] == seen_first
