"""Crashes lose nothing: both trainers, run as the real command line in a subprocess, are killed
with SIGKILL (once inside a checkpoint save, once at an arbitrary moment of training), resumed
with --resume, and must compute exactly the losses of a run that was never killed (CPU, fixed
seeds, one thread: every kernel is deterministic, so equality is exact, not approximate)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]

# Runs a tools/ script after two test-only patches (nothing of this exists in nfdet itself):
# - NFDET_TEST_KILL_IN_SAVE=N: the torch.save of the training checkpoint of iteration/step N
#   writes half of its bytes, flushes them to disk and SIGKILLs its own process;
# - NFDET_TEST_LOSS_LOG=FILE: detectron2's per-iteration losses (before metrics.json's median
#   smoothing) are appended to FILE as JSON lines.
WRAPPER = r'''
import io, json, os, runpy, signal, sys
import torch

kill_at = os.environ.get("NFDET_TEST_KILL_IN_SAVE")
_save = torch.save

def save(obj, f, *args, **kwargs):
    if kill_at is not None and isinstance(obj, dict) and hasattr(f, "write") and \
            obj.get("iteration", obj.get("step")) == int(kill_at):
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)

torch.save = save

loss_log = os.environ.get("NFDET_TEST_LOSS_LOG")
if loss_log:
    from detectron2.engine.train_loop import SimpleTrainer

    _write_metrics = SimpleTrainer.write_metrics

    def write_metrics(loss_dict, data_time, cur_iter, prefix=""):
        row = {k: v.detach().cpu().item() for k, v in loss_dict.items()}
        with open(loss_log, "a") as out:
            out.write(json.dumps({"iteration": cur_iter, **row}) + "\n")
        return _write_metrics(loss_dict, data_time, cur_iter, prefix)

    SimpleTrainer.write_metrics = staticmethod(write_metrics)

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def _start(tmp_path: Path, script: str, args: list[str], **env_extra: str) -> subprocess.Popen:
    wrapper = tmp_path / "run_with_faults.py"
    wrapper.write_text(WRAPPER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **env_extra)
    log_path = tmp_path / f"output_{len(list(tmp_path.glob('output_*.txt')))}.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(wrapper), str(REPO / "tools" / script), *args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    proc.log_path = log_path
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    return rc, proc.log_path.read_text()


def _run(tmp_path: Path, script: str, args: list[str], **env: str) -> tuple[int, str]:
    return _finish(_start(tmp_path, script, args, **env))


def _kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 240) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the moment it was to be killed at"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _pointer(out: Path) -> str:
    try:
        return (out / "last_checkpoint").read_text().strip()
    except FileNotFoundError:
        return ""


def _rows_by_step(rows: list[dict], step_key: str, keys: list[str]) -> dict[int, dict]:
    """One row per step; a step logged twice (redone after a kill) must have equal values."""
    by_step: dict[int, dict] = {}
    for row in rows:
        values = {k: row[k] for k in keys}
        step = row[step_key]
        assert by_step.setdefault(step, values) == values, (step, by_step[step], values)
    return by_step


# ------------------------------------------------------------------------------------ detection
DET_LOSSES = ["loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"]


def _det_args(tiny_coco, out: Path, workers: int) -> list[str]:
    json_path, image_dir = tiny_coco
    return [
        "--config", "quick/nfnet_nano_mask_rcnn_instant.yaml",
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
    rc, log = _run(tmp_path, "train_net.py", _det_args(tiny_coco, ref, 0),
                   NFDET_TEST_LOSS_LOG=str(tmp_path / "ref_losses.jsonl"))
    assert rc == 0, log[-4000:]

    # The same run (with a loader worker process this time), killed and resumed twice.
    out, losses = tmp_path / "killed", str(tmp_path / "killed_losses.jsonl")
    args = _det_args(tiny_coco, out, 1)
    # 1. Killed inside the save of the checkpoint of iteration 3 (half of it written).
    rc, log = _run(tmp_path, "train_net.py", args, NFDET_TEST_KILL_IN_SAVE="3",
                   NFDET_TEST_LOSS_LOG=losses)
    assert rc == -signal.SIGKILL, log[-4000:]
    assert _pointer(out) == "model_0000001.pth"
    assert not (out / "model_0000003.pth").exists()
    assert [p.name for p in out.glob(".tmp-model_0000003.pth-*")]  # the torn write
    # 2. Resumed, then killed at an arbitrary moment: while iteration 4 runs (its losses are
    #    logged, its backward pass and update are under way), after the checkpoint of 3.
    proc = _start(tmp_path, "train_net.py", ["--resume", *args], NFDET_TEST_LOSS_LOG=losses)
    _kill_when(proc, lambda: '"iteration": 4,' in Path(losses).read_text(), delay=0.0)
    log = _finish(proc)[1]
    assert "Starting training from iteration 2" in log
    assert not (out / "model_final.pth").exists()
    assert not list(out.glob(".tmp-model_0000003.pth-*"))  # cleaned by the complete save
    # 3. Resumed to the end.
    rc, log = _run(tmp_path, "train_net.py", ["--resume", *args], NFDET_TEST_LOSS_LOG=losses)
    assert rc == 0, log[-4000:]
    assert "Starting training from iteration 4" in log or "Starting training from iteration 6" \
        in log

    def rows(path):
        return [json.loads(x) for x in Path(path).read_text().splitlines()]

    expected = _rows_by_step(rows(tmp_path / "ref_losses.jsonl"), "iteration", DET_LOSSES)
    resumed = _rows_by_step(rows(losses), "iteration", DET_LOSSES)
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


# --------------------------------------------------------------------------------- pretraining
CLASSES = ("circle", "square", "triangle")


def _make_shapes(root: Path, per_class: int = 8, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 100, 3)))
            draw = ImageDraw.Draw(img)
            r = rng.uniform(0.25, 0.4) * size
            cx, cy = rng.uniform(r, size - r, 2)
            box = [cx - r, cy - r, cx + r, cy + r]
            fill = tuple(int(v) for v in rng.integers(140, 256, 3))
            if c == "circle":
                draw.ellipse(box, fill=fill)
            elif c == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            img.save(root / "train" / c / f"{i}.png")


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
    data = tmp_path / "shapes"
    _make_shapes(data)
    ref = tmp_path / "ref"
    rc, log = _run(tmp_path, "pretrain_net.py", _pretrain_args(data, ref, 0))
    assert rc == 0, log[-4000:]

    out = tmp_path / "killed"
    args = _pretrain_args(data, out, 1)
    # 1. Killed inside the save of the checkpoint of step 4.
    rc, log = _run(tmp_path, "pretrain_net.py", args, NFDET_TEST_KILL_IN_SAVE="4")
    assert rc == -signal.SIGKILL, log[-4000:]
    assert _pointer(out) == "model_0000002.pth"
    assert not (out / "model_0000004.pth").exists()
    assert list(out.glob(".tmp-model_0000004.pth-*"))
    # 2. Resumed, killed at an arbitrary moment: as soon as step 5 is logged (so after the
    #    checkpoint of step 4, somewhere in step 6 or later).
    proc = _start(tmp_path, "pretrain_net.py", ["--resume", *args])
    _kill_when(proc, lambda: '"step": 5,' in (out / "metrics.jsonl").read_text(), delay=0.0)
    log = _finish(proc)[1]
    assert "Resumed from" in log and "model_0000002.pth at step 2" in log
    assert not (out / "model_final.pth").exists()
    # 3. Resumed to the end.
    rc, log = _run(tmp_path, "pretrain_net.py", ["--resume", *args])
    assert rc == 0, log[-4000:]

    def rows(path):
        lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [r for r in lines if "loss" in r]

    expected = _rows_by_step(rows(ref), "step", PRE_KEYS)
    resumed = _rows_by_step(rows(out), "step", PRE_KEYS)
    assert sorted(expected) == list(range(1, 31))
    assert resumed == expected  # exact
    ref_final = torch.load(ref / "model_final.pth", weights_only=True)
    final = torch.load(out / "model_final.pth", weights_only=True)
    for part in ("model",):
        for key, value in ref_final[part].items():
            assert torch.equal(final[part][key], value), key
    for key, value in ref_final["ema"]["model"].items():
        assert torch.equal(final["ema"]["model"][key], value), key
