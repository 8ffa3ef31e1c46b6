"""tools/compare_backbones.py (nfdet.detection.compare): the smoke mode end to end, and the
summary's statistics against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_tool

from nfdet.detection.compare import format_table, read_final_ap, summarize


def test_smoke_mode_prints_the_table(tmp_path):
    out = tmp_path / "cmp"
    proc = run_tool("compare_backbones.py", "--smoke", "--out", out, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = proc.stdout.splitlines()
    header = lines.index("| config | seeds | box AP | segm AP | seconds/run |")
    assert lines[header + 2].startswith("| nano-agc | 1 | ")
    assert lines[header + 3].startswith("| nano-no-agc | 1 | ")
    assert lines[header + 4].startswith("| nano-no-agc - nano-agc (means) |")
    results = json.loads((out / "results.json").read_text())
    assert [(r["name"], r["seed"]) for r in results["runs"]] == [("nano-agc", 0),
                                                                ("nano-no-agc", 0)]
    for run in results["runs"]:
        assert 0.0 <= run["box"] <= 100.0 and 0.0 <= run["segm"] <= 100.0
    assert (out / "summary.md").read_text().startswith("| config |")
    # The per-stage statistics reached metrics.json; only the AGC side has clipped fractions.
    rows = [json.loads(line) for line in
            (out / "nano-agc" / "seed0" / "metrics.json").read_text().splitlines()]
    assert any("agc_clipped/res2" in r and "grad_ratio/res2" in r for r in rows)
    rows = [json.loads(line) for line in
            (out / "nano-no-agc" / "seed0" / "metrics.json").read_text().splitlines()]
    assert any("grad_ratio/res2" in r for r in rows)
    assert not any("agc_clipped/res2" in r for r in rows)


def test_summary_statistics_and_table():
    runs = [{"name": "a", "seed": s, "box": b, "segm": m, "seconds": 10.0}
            for s, b, m in [(0, 10.0, 20.0), (1, 14.0, 26.0), (2, 12.0, 23.0)]]
    runs += [{"name": "b", "seed": s, "box": b, "segm": m, "seconds": 5.0}
             for s, b, m in [(0, 30.0, 40.0), (1, 20.0, 31.0), (2, 25.0, float("nan"))]]
    summary = summarize(runs, ["a", "b"])
    a_segm = summary["sides"]["a"]["segm"]
    assert a_segm["mean"] == pytest.approx(np.mean([20, 26, 23]))
    assert a_segm["std"] == pytest.approx(np.std([20, 26, 23], ddof=1))
    assert (a_segm["min"], a_segm["max"]) == (20.0, 26.0)
    # A missing mask AP (NaN) is left out of the statistics.
    assert summary["sides"]["b"]["segm"]["n"] == 2
    assert summary["difference"]["box"] == pytest.approx(25.0 - 12.0)
    table = format_table(summary).splitlines()
    assert table[2] == "| a | 3 | 12.0 ± 2.0 (10.0-14.0) | 23.0 ± 3.0 (20.0-26.0) | 10 |"
    assert table[4].startswith("| b - a (means) | | +13.0 |")


def test_read_final_ap(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"iteration": 3, "total_loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no COCO evaluation"):
        read_final_ap(path)
    path.write_text(path.read_text() + json.dumps({"iteration": 3, "bbox/AP": 12.5,
                                                   "segm/AP": 7.25}) + "\n")
    assert read_final_ap(path) == {"box": 12.5, "segm": 7.25}
