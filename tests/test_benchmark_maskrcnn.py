"""Smoke test of ``tools/benchmark.py maskrcnn`` (a benchmark, not a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_maskrcnn_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "tools/benchmark.py", "maskrcnn", "--config",
         "quick/nfnet_nano_mask_rcnn_instant.yaml", "--batch-size", "1", "--image-size", "96",
         "--objects", "2", "--iters", "1", "--warmup", "1", "--threads", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training iteration" in res.stdout
    r = json.loads(out.read_text())
    assert r["variant"] == "nano" and r["image_size"] == 96 and r["batch_size"] == 1
    for key in ("train_iter_s", "inference_s", "backbone_eval_cached_s",
                "backbone_eval_uncached_s"):
        assert r[key] > 0, key
