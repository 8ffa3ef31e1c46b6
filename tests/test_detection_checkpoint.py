"""nfdet classification checkpoints as MODEL.WEIGHTS; detectron2 checkpoints still round-trip."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from nfdet.checkpoint import save_checkpoint
from nfdet.detection import (
    NFNetCheckpointer,
    find_trunk_prefix,
    get_nfdet_cfg,
    is_classification_checkpoint,
)
from nfdet.modeling import build_nfnet

QUICK = (
    Path(__file__).resolve().parents[1] / "configs" / "quick" / "nfnet_nano_mask_rcnn_instant.yaml"
)
HEAD_KEYS = ["head.fc.bias", "head.fc.weight"]


def _model(*opts):
    cfg = get_nfdet_cfg()
    cfg.merge_from_file(str(QUICK))
    cfg.merge_from_list(list(opts))
    return build_model(cfg)


def _classification_checkpoint(tmp_path: Path, variant: str = "nano", **overrides) -> tuple:
    torch.manual_seed(1)
    classifier = build_nfnet(variant, num_classes=7, **overrides)
    # Non-default gains/skip gains, so that "loaded" differs from "freshly initialised".
    with torch.no_grad():
        for name, p in classifier.named_parameters():
            if name.endswith(("gain", "bias")):
                p.add_(torch.rand_like(p))
    path = tmp_path / "classifier.pth"
    save_checkpoint(
        {"model": classifier.state_dict(), "meta": {"variant": variant, "num_classes": 7}}, path
    )
    return path, classifier.state_dict()


@pytest.mark.parametrize(
    "backbone_name, res5_final_conv, prefix",
    [
        ("build_nfnet_fpn_backbone", True, "backbone.bottom_up.trunk."),
        ("build_nfnet_fpn_backbone", False, "backbone.bottom_up.trunk."),
        ("build_nfnet_backbone", True, "backbone.trunk."),
    ],
)
def test_classification_checkpoint_loads(tmp_path, caplog, backbone_name, res5_final_conv, prefix):
    path, source = _classification_checkpoint(tmp_path)
    opts = ["MODEL.BACKBONE.NAME", backbone_name, "MODEL.NFNET.RES5_FINAL_CONV", res5_final_conv]
    if backbone_name == "build_nfnet_backbone":
        # A single-level detector: RPN and ROI heads on res5.
        opts += ["MODEL.RPN.IN_FEATURES", ["res5"], "MODEL.ROI_HEADS.IN_FEATURES", ["res5"],
                 "MODEL.ANCHOR_GENERATOR.SIZES", [[32, 64, 128]], "MODEL.MASK_ON", False]
    model = _model(*opts)
    assert find_trunk_prefix(model) == prefix
    checkpointer = NFNetCheckpointer(model)
    with caplog.at_level(logging.INFO):
        checkpointer.load(str(path))
    incompatible = checkpointer.last_incompatible

    expected_unused = list(HEAD_KEYS)
    if not res5_final_conv:
        expected_unused += [k for k in source if k.startswith("trunk.final_conv.")]
    assert sorted(incompatible.unexpected_keys) == sorted(expected_unused)
    assert incompatible.incorrect_shapes == []
    assert not [k for k in incompatible.missing_keys if k.startswith(prefix)]
    # The unused keys are named in the log.
    assert "head.fc.weight" in caplog.text

    state = model.state_dict()
    loaded = 0
    for key, value in source.items():
        if key.startswith("trunk.") and key not in expected_unused:
            torch.testing.assert_close(state[prefix + key[len("trunk."):]], value, rtol=0, atol=0)
            loaded += 1
    assert loaded == len([k for k in state if k.startswith(prefix)])


def test_mismatched_checkpoint_is_an_error_naming_keys_and_shapes(tmp_path):
    # A classifier of another architecture: wider stage widths. detectron2 would only warn and
    # skip those tensors; a backbone that silently stays at random init must be an error.
    path, _ = _classification_checkpoint(tmp_path, widths=(32, 64, 128, 192))
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        NFNetCheckpointer(model).load(str(path))
    message = str(info.value)
    assert str(path) in message and "variant nano" in message
    assert ("backbone.bottom_up.trunk.stages.3.0.conv3.weight: checkpoint (192, 96, 1, 1) vs "
            "model (128, 64, 1, 1)") in message
    # Nothing was loaded.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_detection_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _model()
    NFNetCheckpointer(model, save_dir=str(tmp_path)).save("model_final", iteration=12)
    other = _model()
    checkpointer = NFNetCheckpointer(other, save_dir=str(tmp_path))
    extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 12
    assert checkpointer.last_incompatible.missing_keys == []
    assert checkpointer.last_incompatible.unexpected_keys == []
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)


def test_is_classification_checkpoint():
    assert is_classification_checkpoint({"trunk.stem.conv1.weight": 0, "head.fc.weight": 0})
    assert is_classification_checkpoint({"module.trunk.stem.conv1.weight": 0})
    assert not is_classification_checkpoint({"head.fc.weight": 0})
    assert not is_classification_checkpoint(
        {"trunk.stem.conv1.weight": 0, "backbone.fpn_lateral2.weight": 0}
    )


def test_model_without_nfnet_backbone_is_refused():
    with pytest.raises(ValueError, match="exactly one NFNet backbone"):
        find_trunk_prefix(torch.nn.Linear(2, 2))
