"""Pretraining end to end on a generated folder of drawn shapes (CPU, nano variant): it learns,
resume reproduces the uninterrupted losses, 2 gloo processes stay in sync, and the exported
backbone loads into the detector as MODEL.WEIGHTS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import QUICK, write_flat_shapes

from nfdet.classification import launch, launch_from_args, main, pretrain_argument_parser
from nfdet.classification.engine import PretrainTrainer
from nfdet.classification.launch import setup
from nfdet.modeling import build_nfnet

@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """ImageNet-style folder: ``root/{train,val}/<shape>/*.png``, one drawn shape per image."""
    return write_flat_shapes(tmp_path_factory.mktemp("shapes"), {"train": 40, "val": 16}, size=40)


def _run(argv: list[str]) -> None:
    launch_from_args(pretrain_argument_parser().parse_args(argv))


def _losses(output_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(d["step"], d["loss"]) for d in lines if "loss" in d]


# Small and quick, but with every random part of the recipe switched on (RandAugment beyond
# level 10, MixUp/CutMix, dropout, stochastic depth, EMA) so that resume must restore them all.
FULL_RECIPE = [
    "INPUT.TRAIN_SIZE", "32", "INPUT.TEST_SIZE", "32", "SOLVER.IMS_PER_BATCH", "16",
    "SOLVER.EPOCHS", "2", "LOG.PERIOD", "1", "LOG.PROGRESS_BAR", "False",
    "LOG.TENSORBOARD", "False", "DATA.VAL_SPLIT", "",
    "INPUT.RANDAUGMENT.ENABLED", "True", "INPUT.RANDAUGMENT.NUM_OPS", "2",
    "INPUT.RANDAUGMENT.MAGNITUDE", "15", "INPUT.MIXUP_ALPHA", "0.2", "INPUT.CUTMIX_ALPHA", "1.0",
    "MODEL.DROPOUT", "0.2", "MODEL.NFNET.DROP_PATH_RATE", "0.25",
]


@pytest.fixture(scope="module")
def nano_run(shapes, tmp_path_factory) -> Path:
    """The nano shapes recipe, 60 steps at 32 px (a few seconds on 2 cores)."""
    out = tmp_path_factory.mktemp("nano_run")
    _run(["--config", "nfnet_nano_shapes.yaml", "DATA.ROOT", str(shapes), "OUTPUT_DIR", str(out),
          "SOLVER.EPOCHS", "12", "INPUT.TRAIN_SIZE", "32", "INPUT.TEST_SIZE", "32",
          "LOG.PROGRESS_BAR", "False"])
    return out


@pytest.mark.slow
def test_nano_learns_shapes(nano_run):
    lines = [json.loads(x) for x in (nano_run / "metrics.jsonl").read_text().splitlines()]
    final = lines[-1]
    assert final["step"] == 60
    # 4 classes: chance is 25 %.
    assert final["val/top1"] >= 70.0, final
    assert final["val_ema/top1"] >= 70.0, final
    train = [d for d in lines if "loss" in d]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert all(0.0 <= d["agc_clipped_fraction"] <= 1.0 and d["images_per_s"] > 0 for d in train)
    assert list((nano_run / "tb").iterdir())  # TensorBoard event file
    assert (nano_run / "last_checkpoint").read_text() == "model_final.pth"
    ckpt = torch.load(nano_run / "backbone_final.pth", weights_only=True)
    assert ckpt["meta"]["variant"] == "nano" and ckpt["meta"]["ema"] is True
    model = build_nfnet("nano", num_classes=4)
    model.load_state_dict(ckpt["model"], strict=True)


@pytest.mark.slow
def test_eval_only_reports_trained_accuracy(nano_run, shapes, tmp_path):
    results = main(pretrain_argument_parser().parse_args([
        "--config", "nfnet_nano_shapes.yaml", "--eval-only", "DATA.ROOT", str(shapes),
        "INPUT.TEST_SIZE", "32", "OUTPUT_DIR", str(tmp_path),
        "MODEL.WEIGHTS", str(nano_run / "backbone_final.pth"),
    ]))
    final = [json.loads(x) for x in (nano_run / "metrics.jsonl").read_text().splitlines()][-1]
    # The exported EMA weights, evaluated as raw weights, give the run's EMA accuracy.
    assert results["val/top1"] == pytest.approx(final["val_ema/top1"])


@pytest.mark.slow
def test_exported_backbone_loads_into_detector(nano_run):
    from detectron2.modeling import build_model

    from nfdet.detection import NFNetCheckpointer, get_nfdet_cfg

    cfg = get_nfdet_cfg()
    cfg.merge_from_file(str(QUICK))
    cfg.MODEL.WEIGHTS = str(nano_run / "backbone_final.pth")
    model = build_model(cfg)
    NFNetCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    exported = torch.load(nano_run / "backbone_final.pth", weights_only=True)["model"]
    detector = model.state_dict()
    trunk = [k for k in exported if k.startswith("trunk.")]
    assert trunk
    for key in trunk:
        assert torch.equal(detector["backbone.bottom_up." + key], exported[key]), key


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses(shapes, tmp_path):
    common = ["--config", "nfnet_nano_shapes.yaml", "DATA.ROOT", str(shapes), *FULL_RECIPE]
    _run(common + ["OUTPUT_DIR", str(tmp_path / "a")])
    # Interrupted mid-epoch (10 steps per epoch) and resumed; loading with 2 worker processes
    # must not change the augmentation either.
    b = ["OUTPUT_DIR", str(tmp_path / "b"), "DATA.NUM_WORKERS", "2"]
    _run(common + b + ["SOLVER.STOP_ITER", "13"])
    assert _losses(tmp_path / "b")[-1][0] == 13
    assert not (tmp_path / "b" / "model_final.pth").exists()
    _run(["--resume"] + common + b)
    uninterrupted, resumed = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in uninterrupted] == list(range(1, 21))
    assert resumed == uninterrupted  # exact: same data, RNG, optimizer and EMA state
    a_final = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)
    b_final = torch.load(tmp_path / "b" / "model_final.pth", weights_only=True)
    for key, value in a_final["ema"]["model"].items():
        assert torch.equal(value, b_final["ema"]["model"][key]), key


def _ddp_worker(argv: list[str], out: str) -> None:
    args = pretrain_argument_parser().parse_args(argv)
    torch.set_num_threads(1)
    cfg = setup(args)
    trainer = PretrainTrainer(cfg)
    trainer.train()
    rank = torch.distributed.get_rank()
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict()},
               f"{out}/rank{rank}.pth")


@pytest.mark.slow
def test_two_process_gloo_ranks_agree(shapes, tmp_path):
    out = tmp_path / "ddp"
    argv = ["--config", "nfnet_nano_shapes.yaml", "DATA.ROOT", str(shapes), *FULL_RECIPE,
            "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "6"]
    launch(_ddp_worker, 2, dist_url="auto", args=(argv, str(out)))
    r0, r1 = (torch.load(out / f"rank{r}.pth", weights_only=True) for r in range(2))
    init = build_nfnet("nano", num_classes=4).state_dict()
    for part in ("model", "ema"):
        for key, value in r0[part].items():
            assert torch.equal(value, r1[part][key]), (part, key)
    # Training happened: the weights moved away from a fresh model's.
    assert not torch.equal(r0["model"]["trunk.stem.conv1.weight"], init["trunk.stem.conv1.weight"])
    assert [s for s, _ in _losses(out)] == list(range(1, 7))
    assert (out / "backbone_final.pth").exists()
