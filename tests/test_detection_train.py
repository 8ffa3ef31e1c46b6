"""tools/train_net.py and tools/demo.py end to end on a generated COCO-format dataset, the
command-line helpers behind them and their errors. Crashes lose nothing: killed with SIGKILL
(inside a checkpoint save, at an arbitrary moment) and resumed with --resume, training computes
exactly the losses of a run that was never killed (CPU, fixed seeds, one thread: every kernel is
deterministic, so equality is exact)."""

from __future__ import annotations

import json
import re
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
from helpers import QUICK_NAME, nano, run_tool
from PIL import Image

from nfdet.checkpoint import save_checkpoint
from nfdet.detection.cli import (
    CONFIGS_DIR,
    register_coco_datasets,
    resolve_config_file,
    train_argument_parser,
)


def _run(script: str, *args: str) -> str:
    proc = run_tool(script, *args)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


def _dataset_args(json_path: Path, image_dir: Path, out: Path) -> list[str]:
    return [
        "--register-coco", "tiny_train", str(json_path), str(image_dir),
        "--register-coco", "tiny_val", str(json_path), str(image_dir),
        "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "2", "OUTPUT_DIR", str(out),
    ]


@pytest.mark.slow
def test_train_eval_resume_demo(tiny_coco, tmp_path):
    json_path, image_dir = tiny_coco
    out = tmp_path / "out"
    common = _dataset_args(json_path, image_dir, out)

    # Train 3 iterations (checkpoints every 2) from a classification checkpoint; bare config
    # name via the --config alias.
    weights = tmp_path / "nano_classifier.pth"
    save_checkpoint({"model": nano(num_classes=3, seed=None).state_dict()}, weights)
    log = _run("train_net.py", "--config", "nfnet_nano_mask_rcnn_instant.yaml", *common,
               "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "0", "MODEL.WEIGHTS", str(weights))
    assert "Reading an nfdet classification checkpoint" in log
    assert "unused checkpoint keys: ['head.fc.bias', 'head.fc.weight']" in log
    assert "Starting training from iteration 0" in log
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    train_rows = [m for m in metrics if "total_loss" in m]
    assert train_rows and 0.0 <= train_rows[-1]["agc_clipped_fraction"] <= 1.0

    # Evaluate the final weights: COCO AP tables for boxes and masks.
    log = _run("train_net.py", "--config-file", str(CONFIGS_DIR / QUICK_NAME), "--eval-only",
               *common, "MODEL.WEIGHTS", str(out / "model_final.pth"))
    for task in ("bbox", "segm"):
        assert f"Evaluation results for {task}" in log
        assert re.search(rf"copypaste: Task: {task}\s.*copypaste: AP,AP50,AP75", log, re.S)
    assert "|  AP   |  AP50  |" in log

    # Resume: continues after the saved iteration (model_final.pth holds iteration 2).
    log = _run("train_net.py", "--config", QUICK_NAME, "--resume", *common, "SOLVER.MAX_ITER", "5",
               "TEST.EVAL_PERIOD", "0")
    assert "Starting training from iteration 3" in log
    assert re.search(r"iter: 4\b", log)

    # Demo: draw predictions of the trained model.
    demo_out = tmp_path / "vis"
    images = sorted(image_dir.glob("*.png"))[:2]
    log = _run("demo.py", "--config", QUICK_NAME, "--input", *map(str, images), "--output",
               str(demo_out), "--confidence-threshold", "0.0",
               "--register-coco", "tiny_val", str(json_path), str(image_dir),
               "DATASETS.TEST", "('tiny_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", "2",
               "MODEL.WEIGHTS", str(out / "model_final.pth"))
    written = sorted(demo_out.glob("*.png"))
    assert [p.name for p in written] == [p.name for p in images]
    for drawn, source in zip(written, images):
        assert Image.open(drawn).size == Image.open(source).size


def test_resolve_config_file(tmp_path):
    found = resolve_config_file("nfnet_f0_mask_rcnn.yaml")
    assert Path(found) == CONFIGS_DIR / "nfnet_f0_mask_rcnn.yaml"
    assert Path(resolve_config_file("nfnet_f0_mask_rcnn_3x")) == (
        CONFIGS_DIR / "nfnet_f0_mask_rcnn_3x.yaml"
    )
    assert Path(resolve_config_file(QUICK_NAME)) == CONFIGS_DIR / QUICK_NAME
    explicit = tmp_path / "mine.yaml"
    explicit.write_text("MODEL:\n  MASK_ON: True\n")
    assert resolve_config_file(str(explicit)) == str(explicit)
    with pytest.raises(FileNotFoundError, match="nfnet_f0_mask_rcnn.yaml"):
        resolve_config_file("nfnet_f0_mask_rcn.yaml")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.yaml").write_text("")
    (tmp_path / "b" / "x.yaml").write_text("")
    with pytest.raises(FileNotFoundError, match="ambiguous"):
        resolve_config_file("x.yaml", configs_dir=tmp_path)


def test_argument_parser_aliases():
    parser = train_argument_parser()
    args = parser.parse_args(
        ["--config", "a.yaml", "--register-coco", "n", "j.json", "img", "--resume",
         "--num-gpus", "2", "SOLVER.MAX_ITER", "3"]
    )
    assert args.config_file == "a.yaml"
    assert args.register_coco == [["n", "j.json", "img"]]
    assert args.resume and args.num_gpus == 2
    assert args.opts == ["SOLVER.MAX_ITER", "3"]
    assert parser.parse_args(["--config-file", "b.yaml"]).config_file == "b.yaml"
    assert parser.parse_args([]).config_file == ""


def test_register_coco_errors(tiny_coco, tmp_path):
    json_path, image_dir = tiny_coco
    with pytest.raises(FileNotFoundError, match="missing.json"):
        register_coco_datasets([("x", str(tmp_path / "missing.json"), str(image_dir))])
    with pytest.raises(FileNotFoundError, match="no_images"):
        register_coco_datasets([("x", str(json_path), str(tmp_path / "no_images"))])
    with pytest.raises(ValueError, match="coco_2017_val"):
        register_coco_datasets([("coco_2017_val", str(json_path), str(image_dir))])
    spec = ("nfdet_test_register", str(json_path), str(image_dir))
    register_coco_datasets([spec])
    register_coco_datasets([spec])  # same files again (a launched worker): no error


def test_train_net_cli_bad_key_or_json_is_one_line_error(tiny_coco, tmp_path):
    """A misspelled key on tools/train_net.py: a one-line usage error, no traceback, exit 2, and
    the output folder of an earlier run untouched; a broken dataset file: one line, exit 1."""
    json_path, image_dir = tiny_coco
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("earlier run\n")
    proc = run_tool("train_net.py", "--config", QUICK_NAME, "--register-coco", "t", json_path,
                    image_dir, "DATASETS.TRAIN", "('t',)", "DATASETS.TEST", "('t',)",
                    "OUTPUT_DIR", out, "SOLVER.IMS_PER_BATH", "4")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("error: command line: unknown config key SOLVER.IMS_PER_BATH. Did you mean "
            "SOLVER.IMS_PER_BATCH?") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in out.iterdir()] == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "earlier run\n"

    # A malformed annotation file, found while loading: one line naming file, line and column.
    broken = tmp_path / "broken.json"
    broken.write_text(json_path.read_text()[:500])
    proc = run_tool("train_net.py", "--config", QUICK_NAME, "--register-coco", "t", broken,
                    image_dir, "DATASETS.TRAIN", "('t',)", "DATASETS.TEST", "('t',)",
                    "OUTPUT_DIR", tmp_path / "out2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(rf"train_net.py: error: {broken}:1:\d+: not valid JSON", proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr


# --- kill anywhere and resume -------------------------------------------------------------------
DET_LOSSES = ["loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"]


def _det_args(tiny_coco, out: Path, workers: int) -> list[str]:
    json_path, image_dir = tiny_coco
    return [
        "--config", QUICK_NAME,
        "--register-coco", "tiny_train", str(json_path), str(image_dir),
        "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", "2", "OUTPUT_DIR", str(out), "SEED", "7",
        "SOLVER.MAX_ITER", "14", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0",
        "DATALOADER.NUM_WORKERS", str(workers),
        # Flips and several sizes: the augmentation must be reproduced after a resume too.
        "INPUT.MIN_SIZE_TRAIN", "(96, 112, 128)", "INPUT.RANDOM_FLIP", "horizontal",
    ]


@pytest.mark.slow
def test_detection_kill_anywhere_and_resume_gives_the_same_losses(tiny_coco, tmp_path):
    # Reference: never interrupted, data mapped in the main process.
    ref = tmp_path / "ref"
    rc, log = run_with_faults(tmp_path, "train_net.py", _det_args(tiny_coco, ref, 0),
                   NFDET_TEST_LOSS_LOG=str(tmp_path / "ref_losses.jsonl"))
    assert rc == 0, log[-4000:]

    # The same run (with a loader worker process this time), killed and resumed twice.
    out, losses = tmp_path / "killed", str(tmp_path / "killed_losses.jsonl")
    args = _det_args(tiny_coco, out, 1)
    # 1. Killed inside the save of the checkpoint of iteration 3 (half of it written).
    rc, log = run_with_faults(tmp_path, "train_net.py", args, NFDET_TEST_KILL_IN_SAVE="3",
                   NFDET_TEST_LOSS_LOG=losses)
    assert rc == -signal.SIGKILL, log[-4000:]
    assert last_checkpoint_pointer(out) == "model_0000001.pth"
    assert not (out / "model_0000003.pth").exists()
    assert [p.name for p in out.glob(".tmp-model_0000003.pth-*")]  # the torn write
    # 2. Resumed, then killed at an arbitrary moment: while iteration 4 runs (its losses are
    #    logged, its backward pass and update are under way), after the checkpoint of 3.
    proc = start_with_faults(tmp_path, "train_net.py", ["--resume", *args],
                             NFDET_TEST_LOSS_LOG=losses)
    kill_when(proc, lambda: '"iteration": 4,' in Path(losses).read_text(), delay=0.0)
    log = finish(proc)[1]
    assert "Starting training from iteration 2" in log
    assert not (out / "model_final.pth").exists()
    assert not list(out.glob(".tmp-model_0000003.pth-*"))  # cleaned by the complete save
    # 3. Resumed to the end.
    rc, log = run_with_faults(tmp_path, "train_net.py", ["--resume", *args],
                              NFDET_TEST_LOSS_LOG=losses)
    assert rc == 0, log[-4000:]
    assert "Starting training from iteration 4" in log or "Starting training from iteration 6" \
        in log

    def rows(path):
        return [json.loads(x) for x in Path(path).read_text().splitlines()]

    expected = rows_by_step(rows(tmp_path / "ref_losses.jsonl"), "iteration", DET_LOSSES)
    resumed = rows_by_step(rows(losses), "iteration", DET_LOSSES)
    assert sorted(expected) == list(range(14))
    # Exact equality, iteration by iteration (iterations redone after a kill included).
    assert resumed == expected
    assert len(rows(losses)) > 14  # some iterations really were computed twice
    ref_final = torch.load(ref / "model_final.pth", weights_only=True)["model"]
    final = torch.load(out / "model_final.pth", weights_only=True)["model"]
    for key, value in ref_final.items():
        assert torch.equal(final[key], value), key
    # metrics.json logged every iteration up to each checkpoint before saving it.
    logged = {json.loads(x)["iteration"] for x in (out / "metrics.json").read_text().splitlines()}
    assert set(range(1, 14, 2)) <= logged
