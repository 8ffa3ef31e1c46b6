"""Fine-tuning: pretraining starts from a checkpoint of another label space (10 classes -> 4) at
another resolution; the trunk loads, the classifier is new and the log says so; the exported
backbone loads into the detector."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, write_flat_shapes

from nfdet.checkpoint import save_checkpoint
from nfdet.classification import launch_from_args, pretrain_argument_parser
from nfdet.classification.engine import PretrainTrainer
from nfdet.classification.launch import setup
from nfdet.modeling import build_nfnet


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_flat_shapes(tmp_path_factory.mktemp("shapes"), {"train": 4, "val": 0}, size=48)


@pytest.fixture(scope="module")
def ten_class_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """A 10-class nano classifier whose every tensor differs from a fresh model's, "trained" at
    32 px."""
    torch.manual_seed(123)
    model = build_nfnet("nano", num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "ten_classes.pth"
    save_checkpoint({"model": state, "meta": {"variant": "nano", "num_classes": 10,
                                              "train_size": 32}}, path)
    return path, state


def _args(shapes: Path, out: Path, weights: Path, *extra: str):
    return pretrain_argument_parser().parse_args([
        "--config", "nfnet_nano_shapes.yaml", "DATA.ROOT", str(shapes), "DATA.VAL_SPLIT", "",
        "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(weights), "INPUT.TRAIN_SIZE", "48",
        "INPUT.TEST_SIZE", "48", "LOG.PROGRESS_BAR", "False", "LOG.TENSORBOARD", "False",
        "SOLVER.IMS_PER_BATCH", "8",
        *extra,
    ])


@pytest.mark.parametrize("std", [0.0, 0.01])
def test_trunk_loads_head_is_new_and_logged(shapes, ten_class_checkpoint, tmp_path, std):
    path, state = ten_class_checkpoint
    cfg = setup(_args(shapes, tmp_path, path, "MODEL.HEAD_INIT_STD", str(std)))
    trainer = PretrainTrainer(cfg)
    own = trainer.model.state_dict()
    trunk = [k for k in own if k.startswith("trunk.")]
    assert trunk and set(own) == set(trunk) | {"head.fc.weight", "head.fc.bias"}
    for key in trunk:
        assert torch.equal(own[key], state[key]), key
    # The EMA starts from the loaded weights too.
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(ema[k], state[k]) for k in trunk)
    weight, bias = own["head.fc.weight"], own["head.fc.bias"]
    assert weight.shape == (4, state["head.fc.weight"].shape[1])
    assert torch.count_nonzero(bias) == 0
    if std == 0:
        assert torch.count_nonzero(weight) == 0
    else:
        assert 0.5 * std < weight.std().item() < 1.5 * std
    log = (tmp_path / "log.txt").read_text()
    assert "new classifier (4 classes)" in log
    assert "'head.fc.weight', 'head.fc.bias'" in log
    assert "checkpoint (10, " in log and "model (4, " in log
    assert "trained at 32 px, this run at 48 px" in log


def test_trunk_mismatch_still_fails(shapes, ten_class_checkpoint, tmp_path):
    path, state = ten_class_checkpoint
    broken = dict(state)
    del broken["trunk.stem.conv1.weight"]
    bad = tmp_path / "bad.pth"
    save_checkpoint({"model": broken}, bad)
    cfg = setup(_args(shapes, tmp_path / "out", bad))
    with pytest.raises(ValueError, match="missing: trunk.stem.conv1.weight"):
        PretrainTrainer(cfg)


def test_finetune_run_exports_a_detector_backbone(shapes, ten_class_checkpoint, tmp_path):
    from detectron2.modeling import build_model

    from nfdet.detection import NFNetCheckpointer, get_nfdet_cfg

    path, state = ten_class_checkpoint
    out = tmp_path / "run"
    launch_from_args(_args(shapes, out, path, "SOLVER.MAX_ITER",
                           "2", "LOG.PERIOD", "1", "MODEL.HEAD_INIT_STD", "0.0"))
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in steps if "loss" in d] == [1, 2]
    exported = torch.load(out / "backbone_final.pth", weights_only=True)
    assert exported["meta"]["num_classes"] == 4
    assert exported["model"]["head.fc.weight"].shape[0] == 4

    cfg = get_nfdet_cfg()
    cfg.merge_from_file(str(REPO / "configs" / "quick" / "nfnet_nano_mask_rcnn_instant.yaml"))
    cfg.MODEL.WEIGHTS = str(out / "backbone_final.pth")
    model = build_model(cfg)
    NFNetCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    detector = model.state_dict()
    trunk = [k for k in exported["model"] if k.startswith("trunk.")]
    assert trunk
    for key in trunk:
        assert torch.equal(detector["backbone.bottom_up." + key], exported["model"][key]), key


def test_finetune_config_loads():
    from nfdet.classification.config import load_pretrain_cfg

    cfg = load_pretrain_cfg("nfnet_f0_finetune_imagenet.yaml", [])
    assert cfg.MODEL.HEAD_INIT_STD == 0.0 and cfg.MODEL.NFNET.VARIANT == "F0"
    assert cfg.INPUT.MIXUP_ALPHA == 0.0 and not cfg.INPUT.RANDAUGMENT.ENABLED
