"""Every detection config under configs/ (top level and configs/quick/) loads and builds.

The F-variant detectors (tens to hundreds of millions of parameters) are built on the meta device
(shapes only, no memory, no init cost) with their real variant; the nano quick configs are built
for real on the CPU and run a forward pass.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from torch import nn

from nfdet.detection import NFNetBackbone, get_nfdet_cfg
from nfdet.modeling import build_nfnet, canonical_name

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DETECTION_CONFIGS = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "quick").glob("*.yaml"))
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _load(path: Path):
    cfg = get_nfdet_cfg()
    cfg.merge_from_file(str(path))
    return cfg


def test_config_set_is_complete():
    names = {p.name for p in DETECTION_CONFIGS}
    assert "Base-NFNet-RCNN-FPN.yaml" in names
    for n in range(7):
        for suffix in ("", "_1x", "_3x"):
            assert f"nfnet_f{n}_mask_rcnn{suffix}.yaml" in names
    assert any(p.parent.name == "quick" for p in DETECTION_CONFIGS)


@pytest.mark.parametrize("path", DETECTION_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads_and_builds(path: Path):
    text = path.read_text()
    # Configs name a variant; they never restate the architecture.
    assert not re.search(r"\b(DEPTHS|WIDTHS|depths|widths)\b", text)
    cfg = _load(path)
    assert cfg.MODEL.BACKBONE.NAME == "build_nfnet_fpn_backbone"
    # Normalization in the FPN (nfdet's default, docs/small_batch.md), never in the backbone.
    assert cfg.MODEL.FPN.NORM == "GN"
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert cfg.SOLVER.AGC.ENABLED and not cfg.SOLVER.CLIP_GRADIENTS.ENABLED
    match = re.match(r"nfnet_(f\d)_mask_rcnn(_1x|_3x)?\.yaml", path.name)
    if match:
        assert cfg.MODEL.MASK_ON
        assert canonical_name(cfg.MODEL.NFNET.VARIANT) == match.group(1).upper()
        expected_iters = 270000 if match.group(2) == "_3x" else 90000
        assert cfg.SOLVER.MAX_ITER == expected_iters

    variant = canonical_name(cfg.MODEL.NFNET.VARIANT)
    if variant == "nano":
        model = build_model(cfg)
    else:
        with torch.device("meta"):
            model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, NFNetBackbone)
    assert not [n for n, m in bottom_up.named_modules() if isinstance(m, NORM_TYPES)]

    # Same parameter names as the classifier's trunk, under one prefix; no classifier head.
    with torch.device("meta"):
        classifier = build_nfnet(variant, num_classes=10)
    trunk_names = {n for n in classifier.state_dict() if n.startswith("trunk.")}
    assert {n for n in bottom_up.state_dict()} == trunk_names
    shapes = bottom_up.output_shape()
    assert [shapes[f].stride for f in ("res2", "res3", "res4", "res5")] == [4, 8, 16, 32]
    assert shapes["res5"].channels == classifier.trunk.final_conv.out_channels

    if variant == "nano":
        model.eval()
        size = cfg.INPUT.MIN_SIZE_TEST
        with torch.no_grad():
            out = model([{"image": torch.randint(0, 256, (3, size, size + 16)).float()}])
        assert "instances" in out[0]
