"""NFNet detectron2 backbones: outputs, shapes, built stages, freezing, registration, gradients."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from helpers import NORM_TYPES, quick_cfg

import nfdet.detection.backbone
from nfdet.detection import NFNetBackbone
from nfdet.modeling import build_nfnet, get_variant


@pytest.mark.parametrize("res5_final_conv", [True, False])
def test_output_shape_matches_forward(res5_final_conv):
    spec = get_variant("nano")
    backbone = NFNetBackbone(spec, res5_final_conv=res5_final_conv).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = backbone(x)
    shapes = backbone.output_shape()
    assert list(out) == ["res2", "res3", "res4", "res5"] == list(shapes)
    for name, feature in out.items():
        assert feature.shape[1] == shapes[name].channels
        assert feature.shape[2] * shapes[name].stride == 64
        assert feature.shape[3] * shapes[name].stride == 96
    expected_res5 = spec.num_features if res5_final_conv else spec.widths[-1]
    assert shapes["res5"].channels == expected_res5
    assert (backbone.trunk.final_conv is not None) == res5_final_conv
    assert backbone.size_divisibility == 32


def test_features_are_the_classifier_trunk_tensors():
    classifier = build_nfnet("nano", num_classes=5).eval()
    backbone = NFNetBackbone(get_variant("nano")).eval()
    backbone.trunk.load_state_dict(classifier.trunk.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x)
        stages = classifier.trunk.forward_stages(x)
        final = classifier.forward_features(x)
    for name, stage in zip(("res2", "res3", "res4"), stages):
        torch.testing.assert_close(out[name], stage)
    torch.testing.assert_close(out["res5"], final)
    without_final = NFNetBackbone(get_variant("nano"), res5_final_conv=False).eval()
    without_final.trunk.load_state_dict(classifier.trunk.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(without_final(x)["res5"], stages[3])


def test_only_needed_stages_are_built():
    backbone = NFNetBackbone(get_variant("nano"), out_features=["res3", "res2"])
    assert len(backbone.trunk.stages) == 2
    assert backbone.trunk.final_conv is None
    assert list(backbone.output_shape()) == ["res2", "res3"]
    out = backbone(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res2", "res3"]
    with pytest.raises(ValueError, match="res6"):
        NFNetBackbone(get_variant("nano"), out_features=["res6"])
    with pytest.raises(ValueError, match="non-empty"):
        NFNetBackbone(get_variant("nano"), out_features=[])


def _module_of(name: str) -> str:
    """"trunk.stages.1.0.conv1.weight" -> "stages1"; "trunk.stem.conv1.weight" -> "stem"."""
    parts = name.split(".")
    return parts[1] + parts[2] if parts[1] == "stages" else parts[1]


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at(freeze_at):
    backbone = NFNetBackbone(get_variant("nano"), freeze_at=freeze_at)
    frozen = {_module_of(n) for n, p in backbone.named_parameters() if not p.requires_grad}
    expected = set()
    if freeze_at >= 1:
        expected.add("stem")
    expected |= {f"stages{i}" for i in range(freeze_at - 1) if i < 4}
    if freeze_at >= 5:
        expected.add("final_conv")
    assert frozen == expected
    with pytest.raises(ValueError, match="FREEZE_AT"):
        NFNetBackbone(get_variant("nano"), freeze_at=6)


def test_drop_path_rate_from_cfg():
    cfg = quick_cfg("MODEL.NFNET.DROP_PATH_RATE", 0.2)
    backbone = BACKBONE_REGISTRY.get("build_nfnet_backbone")(cfg, ShapeSpec(channels=3))
    rates = [b.drop_path.rate for stage in backbone.trunk.stages for b in stage]
    assert rates[0] == 0.0 and 0.0 < rates[-1] < 0.2
    assert rates == sorted(rates)


def test_registered_and_reimport_safe():
    assert "build_nfnet_backbone" in BACKBONE_REGISTRY
    assert "build_nfnet_fpn_backbone" in BACKBONE_REGISTRY
    # Executing the module again (as a reload or a second import path would) must not raise
    # "already registered"; a separate module object keeps the classes of other tests intact.
    spec = importlib.util.spec_from_file_location(
        "nfdet.detection._backbone_again", nfdet.detection.backbone.__file__
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert BACKBONE_REGISTRY.get("build_nfnet_backbone") is nfdet.detection.build_nfnet_backbone
    cfg = quick_cfg("MODEL.BACKBONE.NAME", "build_nfnet_backbone",
                     "MODEL.NFNET.OUT_FEATURES", ["res4"])
    backbone = BACKBONE_REGISTRY.get("build_nfnet_backbone")(cfg, ShapeSpec(channels=3))
    assert len(backbone.trunk.stages) == 3
    assert list(backbone.output_shape()) == ["res4"]


def test_bad_cfg_values_are_named():
    with pytest.raises(ValueError, match="MODEL.NFNET.VARIANT"):
        build_model(quick_cfg("MODEL.NFNET.VARIANT", "F99"))
    with pytest.raises(ValueError, match="MODEL.FPN.IN_FEATURES"):
        build_model(quick_cfg("MODEL.NFNET.OUT_FEATURES", ["res2", "res3", "res4"]))


def _targets(h: int, w: int) -> Instances:
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 48.0], [50.0, 30.0, 90.0, 60.0]]))
    inst.gt_classes = torch.tensor([0, 1])
    inst.gt_masks = PolygonMasks(
        [[[8, 8, 40, 8, 40, 48, 8, 48]], [[50, 30, 90, 30, 90, 60, 50, 60]]]
    )
    return inst


@pytest.mark.parametrize("fpn_norm", ["GN", ""], ids=["fpn_gn", "fpn_plain"])
@pytest.mark.parametrize("freeze_at", [0, 2])
def test_detector_has_no_norm_and_every_backbone_param_gets_a_gradient(freeze_at, fpn_norm):
    torch.manual_seed(0)
    cfg = quick_cfg("MODEL.BACKBONE.FREEZE_AT", freeze_at, "MODEL.ROI_HEADS.NUM_CLASSES", 2,
                    "MODEL.FPN.NORM", fpn_norm)
    model = build_model(cfg)
    # The NF trunk never has a normalization layer; the FPN around it has GroupNorm only when
    # MODEL.FPN.NORM asks for it (the small-batch default), and then in every FPN conv.
    trunk_norms = [n for n, m in model.backbone.bottom_up.named_modules()
                   if isinstance(m, NORM_TYPES)]
    assert trunk_norms == []
    norms = {n: type(m) for n, m in model.backbone.named_modules() if isinstance(m, NORM_TYPES)}
    if fpn_norm:
        fpn_convs = [n for n, _ in model.backbone.named_children() if n.startswith("fpn_")]
        assert fpn_convs and sorted(norms) == sorted(f"{n}.norm" for n in fpn_convs)
        assert set(norms.values()) == {torch.nn.GroupNorm}
    else:
        assert norms == {}
    model.train()
    batch = [
        {"image": torch.randint(0, 256, (3, 96, 128)).float(), "instances": _targets(96, 128)}
        for _ in range(2)
    ]
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    trainable = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert no_grad == []
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    if freeze_at == 0:
        assert frozen == []
    else:
        assert frozen and all(
            n.startswith(("bottom_up.trunk.stem.", "bottom_up.trunk.stages.0.")) for n in frozen
        )
        assert all(p.grad is None for n, p in model.backbone.named_parameters() if n in frozen)
