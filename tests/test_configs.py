"""configs/ and nfdet.config: every config file under configs/ passes the checks of its trainer;
every detection config (top level and configs/quick/) loads and builds; bad keys, values and
names in configs are errors naming the culprit.

The F-variant detectors (tens to hundreds of millions of parameters) are built on the meta device
(shapes only, no memory, no init cost) with their real variant; the nano quick configs are built
for real on the CPU and run a forward pass.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from helpers import CONFIGS, NORM_TYPES, QUICK, tiny_coco_cfg

from nfdet.classification.config import load_pretrain_cfg
from nfdet.config import ConfigError, merge_config, resolve_config_file
from nfdet.detection import NFNetBackbone, get_nfdet_cfg
from nfdet.detection.cli import setup_cfg, train_argument_parser
from nfdet.modeling import build_nfnet, canonical_name

DETECTION_CONFIGS = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "quick").glob("*.yaml"))
# Every config file, in every folder: each is checked by the trainer it is for.
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
DETECTION_BASE = CONFIGS / "Base-NFNet-RCNN-FPN.yaml"
# The NF-ResNet detectors mirror detectron2's R-CNN FPN base (tests/test_nf_resnet.py).
NF_RESNET_DETECTION_BASE = CONFIGS / "Base-NFResNet-RCNN-FPN.yaml"
PRETRAIN_BASE = CONFIGS / "pretrain" / "Base-NFNet-Pretrain.yaml"


def _load(path: Path):
    cfg = get_nfdet_cfg()
    cfg.merge_from_file(str(path))
    return cfg


def _chain_root(path: Path) -> Path:
    """The file at the end of ``path``'s ``_BASE_`` chain (relative bases, as detectron2)."""
    while (base := yaml.safe_load(path.read_text()).get("_BASE_")) is not None:
        path = (path.parent / base).resolve()
    return path


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_file_passes_the_checks_of_its_trainer(path: Path):
    root = _chain_root(path)
    assert root in (DETECTION_BASE, NF_RESNET_DETECTION_BASE, PRETRAIN_BASE), (
        f"{path}: its _BASE_ chain ends in {root}")
    if root == PRETRAIN_BASE:
        # tools/pretrain_net.py's loading: merge, variant check, pretraining value checks.
        cfg = load_pretrain_cfg(str(path))
    else:
        # tools/train_net.py's loading: merge with unknown-key and variant checks.
        cfg = setup_cfg(train_argument_parser().parse_args(["--config-file", str(path)]))
    canonical_name(cfg.MODEL.NFNET.VARIANT)


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
    # Normalization in the FPN (nfdet's default, docs/small_batch.md), never in the backbone;
    # the NF-ResNet configs keep detectron2's FPN without normalization.
    nf_resnet = _chain_root(path) == NF_RESNET_DETECTION_BASE
    assert cfg.MODEL.FPN.NORM == ("" if nf_resnet else "GN")
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
    final_conv = classifier.trunk.final_conv
    assert shapes["res5"].channels == (final_conv.out_channels if final_conv is not None
                                       else classifier.trunk.stage_channels[-1])

    if variant == "nano":
        model.eval()
        size = cfg.INPUT.MIN_SIZE_TEST
        with torch.no_grad():
            out = model([{"image": torch.randint(0, 256, (3, size, size + 16)).float()}])
        assert "instances" in out[0]


# --- merge errors (nfdet.config) ---------------------------------------------------------------


def test_unknown_variant_names_key_value_and_close_match(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: MODEL.NFNET.VARIANT: Unknown NFNet "
                       r"variant 'F0p'. Did you mean F0 or F0\+\? Valid variants: F0, F0\+"):
        tiny_coco_cfg(MODEL__NFNET__VARIANT="F0p")
    config = tmp_path / "mine.yaml"
    config.write_text(f"_BASE_: {str(QUICK)!r}\nMODEL:\n  NFNET:\n"
                      "    VARIANT: nanno\n")
    with pytest.raises(ConfigError, match=rf"{config}: MODEL.NFNET.VARIANT: .*'nanno'.*nano"):
        merge_config(get_nfdet_cfg(), str(config))
    with pytest.raises(ConfigError, match="MODEL.NFNET.VARIANT: Unknown NFNet variant 'F9'"):
        load_pretrain_cfg("nfnet_nano_shapes", ["MODEL.NFNET.VARIANT", "F9"])


def test_misspelled_key_in_file_names_file_key_and_suggestion(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("SOLVER:\n  AGC:\n    CLIPING: 0.1\n")
    config = tmp_path / "child.yaml"
    config.write_text("_BASE_: base.yaml\nMODEL:\n  NFNET:\n    VARIANT: nano\n")
    # The key is in the _BASE_ file: that file is named.
    with pytest.raises(ConfigError, match=rf"^{base}: unknown config key SOLVER.AGC.CLIPING. "
                       r"Did you mean SOLVER.AGC.CLIPPING\?"):
        merge_config(get_nfdet_cfg(), str(config))
    # Pretraining config, key in the file itself.
    pre = tmp_path / "pre.yaml"
    pre.write_text("DATA:\n  NUM_WORKER: 2\n")
    with pytest.raises(ConfigError, match=rf"^{pre}: unknown config key DATA.NUM_WORKER. Did "
                       r"you mean DATA.NUM_WORKERS\?"):
        load_pretrain_cfg(str(pre))
    # YAML syntax: file, line and column.
    broken = tmp_path / "broken.yaml"
    broken.write_text("MODEL:\n  NFNET: [nano\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:3:1: not valid YAML"):
        merge_config(get_nfdet_cfg(), str(broken))


def test_misspelled_key_on_command_line_names_key_and_suggestion():
    with pytest.raises(ConfigError, match=r"command line: unknown config key "
                       r"MODEL.NFNET.VARAINT. Did you mean MODEL.NFNET.VARIANT\?"):
        tiny_coco_cfg(MODEL__NFNET__VARAINT="nano")
    with pytest.raises(ConfigError, match=r"command line: unknown config key INPUT.TRAIN_SIZ. "
                       r"Did you mean INPUT.TRAIN_SIZE\?"):
        load_pretrain_cfg("nfnet_nano_shapes", ["INPUT.TRAIN_SIZ", "64"])
    with pytest.raises(ConfigError, match=r"command line: SOLVER.BASE_LR 'fast'.*SOLVER.BASE_LR"):
        tiny_coco_cfg(SOLVER__BASE_LR="fast")
    with pytest.raises(ConfigError, match=r"'SOLVER.MAX_ITER' has no value"):
        load_pretrain_cfg("nfnet_nano_shapes", ["SOLVER.MAX_ITER"])


def test_missing_config_name_lists_close_matches():
    with pytest.raises(FileNotFoundError, match=r"'nfnet_f0_mask_rnn'.*nfnet_f0_mask_rcnn.yaml"):
        resolve_config_file("nfnet_f0_mask_rnn")
    with pytest.raises(FileNotFoundError, match=r"'nfnet_f0_imagenett'.*nfnet_f0_imagenet.yaml"):
        load_pretrain_cfg("nfnet_f0_imagenett")
    args = train_argument_parser().parse_args(["--config", "nfnet_nano_mask_rcnn_instnt"])
    with pytest.raises(FileNotFoundError, match="quick/nfnet_nano_mask_rcnn_instant.yaml"):
        setup_cfg(args)
