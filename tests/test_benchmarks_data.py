"""``tools/benchmark.py data`` (nfdet.benchmarks.data) in its smoke mode: it runs, reports both
stages of the current pipeline for F0 and F3 and, given an older transforms module, times that
too (a benchmark, not a timed test: no speed is asserted)."""

from __future__ import annotations

import json

from helpers import run_tool

# The interface of nfdet's earlier transforms module that --legacy-transforms times: a per-image
# transform and a batch mixing function (a stand-in here, so the test needs no git history).
LEGACY = '''
import torch
from torchvision.transforms import v2

def build_train_transform(cfg):
    return v2.Compose([v2.RandomResizedCrop(cfg.INPUT.TRAIN_SIZE), v2.PILToTensor()])

def mix_batch(images, targets, mixup_alpha, cutmix_alpha, rng):
    return images.flip(0), targets
'''


def test_data_smoke(tmp_path):
    legacy = tmp_path / "old_transforms.py"
    legacy.write_text(LEGACY)
    out = tmp_path / "data.json"
    res = run_tool("benchmark.py", "data", "--smoke", "--json", out, "--legacy-transforms", legacy,
                   "--data-dir", tmp_path / "images", timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["machine"]["device"] == "cpu" and r["machine"]["threads"] == 1
    rows = {(row["variant"], row["pipeline"]): row for row in r["rows"]}
    assert set(rows) == {(v, p) for v in ("F0", "F3") for p in ("current", "legacy")}
    for v, size in (("F0", 192), ("F3", 320)):
        current = rows[(v, "current")]
        assert current["train_size"] == size and current["sources_per_example"] == 2
        assert current["image_stage_s"] > 0 and current["batch_stage_s"] > 0
        assert current["source_images_per_s"] == 2 * current["examples_per_s"] > 0
        assert rows[(v, "legacy")]["main_process_mix_batch_s"] > 0
    assert len(list((tmp_path / "images" / "train").rglob("*.jpg"))) == r["num_images"]
    assert "examples/s" in res.stdout
