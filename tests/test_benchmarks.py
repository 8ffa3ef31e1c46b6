"""``tools/benchmark.py``: every subcommand in its smoke mode (so the benchmarks keep working; they
are benchmarks, not timed tests), and the shared machinery (peak memory, agreement check,
summaries)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nfdet.benchmarks.backbone import CONFIGS, MODELS, MODES, check_agreement, summarize
from nfdet.benchmarks.harness import format_table, peak_memory_bytes, time_interleaved
from nfdet.modeling import build_nfnet

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path, *args: str, timeout: int = 600) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "tools/benchmark.py", *args, "--smoke", "--threads", "1",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout, json.loads(out.read_text())


# The default set times the "default" configuration only; every configuration (channels_last and
# torch.compile of three F0-sized models) runs in the slow set.
@pytest.mark.parametrize("configs", [
    ("default",), pytest.param(CONFIGS, marks=pytest.mark.slow)], ids=["default", "all"])
def test_backbone_smoke(tmp_path, configs):
    pytest.importorskip("timm", reason="timm is the reference model (test extra)")
    stdout, r = _run(tmp_path, "backbone", "--configs", ",".join(configs))
    assert r["variant"] == "F0" and r["sizes"] == [64] and r["machine"]["device"] == "cpu"
    # nfdet and timm were checked to compute the same logits before timing.
    assert r["nfdet_vs_timm_max_rel_logit_diff"] < 1e-3
    cases = {(row["model"], row["config"], row["mode"]) for row in r["rows"]}
    assert cases == {(m, c, mo) for m in MODELS for c in configs for mo in MODES}
    for row in r["rows"]:
        assert row["median_s"] > 0 and row["images_per_s"] > 0
        assert row["peak_memory_mb"] > 0, row
    # Training allocates the weight gradients (F0: ~270 MB), eval does not.
    train = {row["model"]: row["peak_memory_mb"] for row in r["rows"]
             if row["config"] == "default" and row["mode"] == "train"}
    assert train["nfdet"] > 250 and train["timm"] > 250
    assert {(s["mode"], s["vs"]) for s in r["summary"]} == {
        (mo, vs) for mo in MODES for vs in ("timm", "resnet50")
    }
    assert "nfdet vs timm logits" in stdout and "img/s" in stdout


def test_agc_smoke(tmp_path):
    stdout, r = _run(tmp_path, "agc", "--variant", "nano", "--num-classes", "4")
    assert r["variant"] == "nano" and r["batch_size"] == 1 and r["image_size"] == 64
    assert r["agc_s"] > 0 and r["loop_s"] > 0 and r["train_step_s"] > 0
    assert 0 < r["agc_share_of_step"] < 1
    assert "clip_grad_agc_" in stdout


def test_detection_smoke(tmp_path):
    stdout, r = _run(
        tmp_path, "detection", "--configs",
        "quick/nfnet_nano_mask_rcnn_instant.yaml,"
        "d2:COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    )
    assert [row["config"] for row in r["rows"]] == [
        "quick/nfnet_nano_mask_rcnn_instant.yaml",
        "d2:COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    ]
    nano, r50 = r["rows"]
    assert "nfnet" in nano["backbone"] and "resnet" in r50["backbone"]
    for row in r["rows"]:
        for key in ("train_iter_s", "inference_s_per_image", "train_peak_memory_mb",
                    "inference_peak_memory_mb"):
            assert row[key] > 0, (row["config"], key)
    assert r["height"] == 128 and r["width"] == 160
    assert "R50-FPN" in stdout


def test_peak_memory_counts_what_a_call_allocates():
    cpu = torch.device("cpu")

    def allocate() -> None:
        a = torch.ones(1 << 20)  # 4 MiB, freed before the next one
        del a
        b = torch.ones(1 << 19)  # 2 MiB
        del b

    peak = peak_memory_bytes(allocate, cpu)
    assert 4 << 20 <= peak < 5 << 20
    keep = []
    grads = peak_memory_bytes(lambda: keep.append(torch.zeros(1 << 18)), cpu)
    assert grads >= 1 << 20
    # What a setup frees before the call does not offset the call's own allocations.
    state = {"x": torch.zeros(1 << 20)}
    peak = peak_memory_bytes(lambda: state.update(x=torch.zeros(1 << 20)), cpu,
                             setup=lambda: state.update(x=None))
    assert peak >= 4 << 20


def test_interleaved_timing_and_table():
    calls = []
    cases = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    t = time_interleaved(cases, repeats=3, warmup=2, device=torch.device("cpu"))
    # Interleaved warm-up rounds, then interleaved repeats in alternating order.
    assert calls == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b"]
    assert set(t) == {"a", "b"} and all(v["repeats"] == 3 for v in t.values())
    table = format_table(["name", "ms"], [["a", 1.25], ["bbb", 10.0]])
    assert table.splitlines()[0].split() == ["name", "ms"] and "10.0" in table


def test_summary_compares_defaults_and_bests():
    rows = [
        {"model": m, "config": c, "mode": "eval", "size": 64, "median_s": t}
        for m, c, t in [("nfdet", "default", 1.0), ("nfdet", "compile", 0.5),
                        ("timm", "default", 2.0), ("timm", "channels_last", 0.8),
                        ("resnet50", "default", 0.25)]
    ]
    by_vs = {s["vs"]: s for s in summarize(rows)}
    assert by_vs["timm"]["default_speedup"] == pytest.approx(2.0)
    assert by_vs["timm"]["best_speedup"] == pytest.approx(1.6)
    assert (by_vs["timm"]["nfdet_best"], by_vs["timm"]["other_best"]) == (
        "compile", "channels_last")
    assert by_vs["resnet50"]["default_speedup"] == pytest.approx(0.25)


def test_agreement_check_refuses_different_models():
    a = build_nfnet("nano", num_classes=10)
    b = build_nfnet("nano", num_classes=10)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_()
    with pytest.raises(SystemExit, match="differ"):
        check_agreement(a, b, 32, torch.device("cpu"), 1e-3)
    assert check_agreement(a, a, 32, torch.device("cpu"), 1e-3) == 0.0


def test_agc_reference_loop_matches_clip_grad_agc():
    """The benchmark's per-tensor loop clips exactly as ``clip_grad_agc_`` (channels_last 3x3
    weights, 1-d and 0-d parameters included), so the two time the same work."""
    import copy

    from nfdet.benchmarks.agc import agc_loop_
    from nfdet.solver import clip_grad_agc_

    torch.manual_seed(0)
    model = build_nfnet("nano", num_classes=10)
    model.train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(dim=1).sum().backward()
    for p in model.parameters():
        p.grad.mul_(50.0)  # make some units clip
    other = copy.deepcopy(model)
    for a, b in zip(model.parameters(), other.parameters()):
        b.grad = a.grad.clone()
    clipped = clip_grad_agc_(list(model.parameters()), clipping=0.01)
    agc_loop_(list(other.parameters()), clipping=0.01)
    assert 0.0 < clipped.item() < 1.0
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_library_never_imports_a_benchmark():
    """Benchmarks depend on the library, not the other way: no module of the library packages
    imports a benchmark module, at import time or inside a function, and importing them in a fresh
    interpreter loads none."""
    import ast

    library = ("checkpoint", "classification", "data", "modeling", "solver")
    offenders = []
    for package in library:
        for path in sorted((REPO / "nfdet" / package).rglob("*.py")):
            parts = ["nfdet", *path.relative_to(REPO / "nfdet").with_suffix("").parts]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    base = parts[: len(parts) - node.level] if node.level else []
                    targets = [".".join([*base, *(node.module or "").split(".")]).strip(".")]
                    targets += [f"{targets[0]}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    continue
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {t}"
                              for t in targets
                              if t.startswith("nfdet.benchmarks") or t.endswith(".benchmark")]
    assert not offenders, offenders
    code = ("import sys\n"
            + "".join(f"import nfdet.{package}\n" for package in library)
            + "print(sorted(m for m in sys.modules if m.startswith('nfdet.benchmarks')"
            " or (m.startswith('nfdet.') and m.endswith('.benchmark'))))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip() == "[]"
