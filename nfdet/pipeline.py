"""The whole nfdet pipeline on generated data: what ``make demo`` runs.

Every step is one of the command-line tools a user runs on real data, started as a subprocess
with a config from ``configs/demo/`` (no separate code path):

1. ``tools/make_demo_data.py``: drawn shapes as a classification folder and a COCO-format
   instance segmentation dataset (train + held-out val);
2. ``tools/pretrain_net.py``: pretrain the ``nano`` NFNet on the classification folder (AGC);
3. ``tools/train_net.py``: Mask R-CNN nano-FPN from that backbone (``MODEL.WEIGHTS``), then COCO
   evaluation (box and mask AP) on the held-out split;
4. ``tools/demo.py``: predictions on held-out images drawn as PNGs;

then a summary (printed and written to ``OUT/summary.json``).
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = ["run_pipeline", "read_coco_ap", "DEMO_CONFIGS"]

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = {
    "pretrain": REPO / "configs" / "demo" / "nfnet_nano_pretrain.yaml",
    "detect": REPO / "configs" / "demo" / "nfnet_nano_mask_rcnn.yaml",
}
TRAIN_NAME, VAL_NAME = "demo_shapes_train", "demo_shapes_val"


def _run(step: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> float:
    """Run one tool, streaming its output to the console and to ``log_path``."""
    print(f"\n=== [{step}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"demo step {step!r} failed (exit code {code}); its log: {log_path}")
    return time.perf_counter() - start


def read_coco_ap(metrics_json: str | os.PathLike) -> dict[str, float]:
    """Return the last COCO ``bbox/AP`` and ``segm/AP`` (percent) that detectron2 wrote to a
    ``metrics.json`` (one JSON object per line).

    Raises:
        ValueError: the file holds no COCO evaluation result.
    """
    found: dict[str, float] = {}
    with open(metrics_json) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            for key in ("bbox/AP", "segm/AP", "bbox/AP50", "segm/AP50"):
                if key in record:
                    found[key] = float(record[key])
    if "bbox/AP" not in found:
        raise ValueError(f"{metrics_json}: no COCO evaluation result (bbox/AP) in it")
    return found


def run_pipeline(
    out_dir: str | os.PathLike,
    data_args: Sequence[str] = (),
    pretrain_opts: Sequence[str] = (),
    detect_opts: Sequence[str] = (),
    num_vis: int = 8,
    python: str = sys.executable,
) -> dict:
    """Run the demo pipeline and return the summary (also written to ``OUT/summary.json``).

    Args:
        out_dir (str): where everything goes (data, pretraining, detection, drawings, logs).
        data_args (list[str]): extra arguments of ``tools/make_demo_data.py``.
        pretrain_opts (list[str]): extra ``KEY VALUE`` overrides of the pretraining config.
        detect_opts (list[str]): extra ``KEY VALUE`` overrides of the detection config.
        num_vis (int): how many held-out images to draw predictions on.
        python (str): the interpreter that runs the tools.
    """
    layout = _Layout.under(Path(out_dir).resolve())
    layout.logs.mkdir(parents=True, exist_ok=True)
    tools = _Tools(python, layout.logs, dict(os.environ, PYTHONUNBUFFERED="1"))
    start = time.perf_counter()
    tools.run("data", "data", "tools/make_demo_data.py", str(layout.data), *data_args)
    _pretrain(tools, layout, pretrain_opts)
    ap = _train_detector(tools, layout, detect_opts)
    _draw_predictions(tools, layout, num_vis, detect_opts)
    summary = _summary(ap, time.perf_counter() - start, tools.timings, layout)
    with open(layout.out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    _print_summary(summary, layout.out)
    return summary


class _Layout(NamedTuple):
    """Where the demo's steps write, under ``out``."""

    out: Path
    logs: Path
    data: Path
    coco: Path
    pretrain: Path
    backbone: Path
    detect: Path
    detector: Path
    predictions: Path

    @classmethod
    def under(cls, out: Path) -> _Layout:
        data, pretrain, detect = out / "data", out / "pretrain", out / "detect"
        return cls(
            out=out, logs=out / "logs", data=data, coco=data / "coco", pretrain=pretrain,
            backbone=pretrain / "backbone_final.pth", detect=detect,
            detector=detect / "model_final.pth", predictions=out / "predictions",
        )

    def register_args(self) -> list[str]:
        """``--register-coco`` for the generated train and held-out splits."""
        return [
            "--register-coco", TRAIN_NAME, str(self.coco / "train.json"), str(self.coco / "train"),
            "--register-coco", VAL_NAME, str(self.coco / "val.json"), str(self.coco / "val"),
        ]


@dataclass
class _Tools:
    """Runs the command-line tools with one interpreter and environment, a log file per step in
    ``logs``, and keeps each step's wall time."""

    python: str
    logs: Path
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, step: str, title: str, script: str, *args: str) -> None:
        self.timings[step] = _run(title, [self.python, script, *args], self.logs / f"{step}.log",
                                  self.env)


def _pretrain(tools: _Tools, layout: _Layout, opts: Sequence[str]) -> None:
    """Pretrain the ``nano`` NFNet on the generated classification folder."""
    tools.run(
        "pretrain", "pretrain", "tools/pretrain_net.py",
        "--config-file", str(DEMO_CONFIGS["pretrain"]),
        "DATA.ROOT", str(layout.data / "classification"), "OUTPUT_DIR", str(layout.pretrain),
        *opts,
    )
    if not layout.backbone.is_file():
        raise RuntimeError(f"pretraining finished without writing {layout.backbone}")


def _train_detector(tools: _Tools, layout: _Layout, opts: Sequence[str]) -> dict[str, float]:
    """Train Mask R-CNN from the pretrained backbone and return its COCO AP on the held-out
    split (``read_coco_ap``)."""
    tools.run(
        "detect", "detect (train + COCO evaluation)", "tools/train_net.py",
        "--config-file", str(DEMO_CONFIGS["detect"]), *layout.register_args(),
        "MODEL.WEIGHTS", str(layout.backbone), "OUTPUT_DIR", str(layout.detect), *opts,
    )
    return read_coco_ap(layout.detect / "metrics.json")


def _draw_predictions(tools: _Tools, layout: _Layout, num_vis: int, opts: Sequence[str]) -> None:
    """Draw the detector's predictions on the first ``num_vis`` held-out images."""
    val_images = sorted(glob.glob(str(layout.coco / "val" / "*.png")))[:num_vis]
    tools.run(
        "draw", "draw", "tools/demo.py",
        "--config-file", str(DEMO_CONFIGS["detect"]), *layout.register_args(),
        "--input", *val_images, "--output", str(layout.predictions),
        "MODEL.WEIGHTS", str(layout.detector), *opts,
    )


def _summary(ap: dict[str, float], seconds: float, timings: dict[str, float],
             layout: _Layout) -> dict:
    return {
        "box_ap": round(ap["bbox/AP"], 2),
        "mask_ap": round(ap["segm/AP"], 2) if "segm/AP" in ap else math.nan,
        "box_ap50": round(ap.get("bbox/AP50", math.nan), 2),
        "mask_ap50": round(ap.get("segm/AP50", math.nan), 2),
        "seconds": round(seconds, 1),
        "step_seconds": {k: round(v, 1) for k, v in timings.items()},
        "paths": {
            "data": str(layout.data),
            "backbone": str(layout.backbone),
            "detector": str(layout.detector),
            "coco_eval": str(layout.detect / "inference"),
            "predictions": str(layout.predictions),
            "logs": str(layout.logs),
        },
    }


def _print_summary(summary: dict, out: Path) -> None:
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in summary["step_seconds"].items())
    print(
        "\n================ nfdet demo summary ================\n"
        f"box AP  (COCO AP@[.5:.95], held-out val): {summary['box_ap']:.2f}"
        f"   (AP50 {summary['box_ap50']:.2f})\n"
        f"mask AP (COCO AP@[.5:.95], held-out val): {summary['mask_ap']:.2f}"
        f"   (AP50 {summary['mask_ap50']:.2f})\n"
        f"time: {summary['seconds']:.0f} s ({steps})\n"
        f"pretrained backbone: {summary['paths']['backbone']}\n"
        f"detector:            {summary['paths']['detector']}\n"
        f"prediction drawings: {summary['paths']['predictions']}\n"
        f"summary:             {out / 'summary.json'}\n"
        "====================================================",
        flush=True,
    )
