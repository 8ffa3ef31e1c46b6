"""Pretraining end to end on a generated folder of drawn shapes (CPU, nano variant): it learns,
resume reproduces the uninterrupted losses, 2 gloo processes stay in sync, and the exported
backbone loads into the detector as MODEL.WEIGHTS; killed with SIGKILL (inside a checkpoint save,
at an arbitrary moment) and resumed, tools/pretrain_net.py computes exactly the losses of an
uninterrupted run; its command-line errors."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from crash import (
    finish,
    kill_when,
    last_checkpoint_pointer,
    rows_by_step,
    run_with_faults,
    start_with_faults,
)
from helpers import FLAT_SHAPES, QUICK, run_tool, write_flat_shapes

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


def test_pretrain_net_misspelled_key_exits_2_with_suggestion(tmp_path):
    out = tmp_path / "out"
    proc = run_tool("pretrain_net.py", "--config", "nfnet_nano_shapes.yaml", "OUTPUT_DIR", out,
                    "SOLVER.BASE_LRR", "0.1", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "pretrain_net.py: error: command line: unknown config key SOLVER.BASE_LRR. Did you mean "
        "SOLVER.BASE_LR?"
    )
    assert "Traceback" not in proc.stderr and not out.exists()


def test_pretrain_unknown_config_name_exits_2(tmp_path, capsys):
    args = pretrain_argument_parser().parse_args(
        ["--config", "nfnet_nano_shape.yaml", "OUTPUT_DIR", str(tmp_path / "out")]
    )
    with pytest.raises(SystemExit) as exit_info:
        launch_from_args(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Config 'nfnet_nano_shape.yaml' is neither a file nor a config" in err
    assert not (tmp_path / "out").exists()


# --- kill anywhere and resume -------------------------------------------------------------------
PRE_KEYS = ["loss", "lr", "train_top1"]


def _pretrain_args(data: Path, out: Path, workers: int) -> list[str]:
    return [
        "--config", "nfnet_nano_shapes.yaml", "DATA.ROOT", str(data), "OUTPUT_DIR", str(out),
        "DATA.VAL_SPLIT", "", "MODEL.NUM_CLASSES", "3", "SEED", "3",
        "INPUT.TRAIN_SIZE", "32", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.MAX_ITER", "30",
        "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.CHECKPOINT_EVERY_EPOCH", "False",
        "LOG.PERIOD", "1", "LOG.PROGRESS_BAR", "False", "LOG.TENSORBOARD", "False",
        "DATA.NUM_WORKERS", str(workers),
        # Every random part of the recipe on, so that resume must restore them all.
        "INPUT.RANDAUGMENT.ENABLED", "True", "INPUT.MIXUP_ALPHA", "0.2",
        "INPUT.CUTMIX_ALPHA", "1.0", "MODEL.DROPOUT", "0.2", "MODEL.NFNET.DROP_PATH_RATE", "0.2",
    ]


@pytest.mark.slow
def test_pretrain_kill_anywhere_and_resume_gives_the_same_losses(tmp_path):
    data = write_flat_shapes(tmp_path / "shapes", {"train": 8}, size=32,
                             classes=FLAT_SHAPES[:3])
    ref = tmp_path / "ref"
    rc, log = run_with_faults(tmp_path, "pretrain_net.py", _pretrain_args(data, ref, 0))
    assert rc == 0, log[-4000:]

    out = tmp_path / "killed"
    args = _pretrain_args(data, out, 1)
    # 1. Killed inside the save of the checkpoint of step 4.
    rc, log = run_with_faults(tmp_path, "pretrain_net.py", args, NFDET_TEST_KILL_IN_SAVE="4")
    assert rc == -signal.SIGKILL, log[-4000:]
    assert last_checkpoint_pointer(out) == "model_0000002.pth"
    assert not (out / "model_0000004.pth").exists()
    assert list(out.glob(".tmp-model_0000004.pth-*"))
    # 2. Resumed, killed at an arbitrary moment: as soon as step 5 is logged (so after the
    #    checkpoint of step 4, somewhere in step 6 or later).
    proc = start_with_faults(tmp_path, "pretrain_net.py", ["--resume", *args])
    kill_when(proc, lambda: '"step": 5,' in (out / "metrics.jsonl").read_text(), delay=0.0)
    log = finish(proc)[1]
    assert "Resumed from" in log and "model_0000002.pth at step 2" in log
    assert not (out / "model_final.pth").exists()
    # 3. Resumed to the end.
    rc, log = run_with_faults(tmp_path, "pretrain_net.py", ["--resume", *args])
    assert rc == 0, log[-4000:]

    def rows(path):
        lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [r for r in lines if "loss" in r]

    expected = rows_by_step(rows(ref), "step", PRE_KEYS)
    resumed = rows_by_step(rows(out), "step", PRE_KEYS)
    assert sorted(expected) == list(range(1, 31))
    assert resumed == expected  # exact
    ref_final = torch.load(ref / "model_final.pth", weights_only=True)
    final = torch.load(out / "model_final.pth", weights_only=True)
    for part in ("model",):
        for key, value in ref_final[part].items():
            assert torch.equal(final[part][key], value), key
    for key, value in ref_final["ema"]["model"].items():
        assert torch.equal(final["ema"]["model"][key], value), key
