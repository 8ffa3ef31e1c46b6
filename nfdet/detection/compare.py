"""Compare two detector configs on the same COCO-format data, budget and seeds.

Each (config, seed) is one run of ``tools/train_net.py`` (the project's own training entry, in a
subprocess, so runs share nothing) with ``SOLVER.MAX_ITER``, ``SEED`` and the datasets set
alike; detectron2's COCO evaluation at the end of training gives box and mask AP on the held-out
set. The summary has the mean, sample standard deviation, min and max of each over the seeds, side
by side, and the difference of the means. A run whose output folder already holds a finished
result (``result.json``) is not repeated, so an interrupted comparison continues where it stopped.

``tools/compare_backbones.py`` is the command line; ``docs/small_batch.md`` shows a result.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "RunSpec",
    "run_one",
    "compare",
    "summarize",
    "format_table",
    "read_final_ap",
    "write_smoke_coco",
]

REPO = Path(__file__).resolve().parents[2]
TRAIN_NAME, TEST_NAME = "compare_train", "compare_test"
_AP_KEYS = {"box": "bbox/AP", "segm": "segm/AP"}


@dataclass
class RunSpec:
    """One side of the comparison.

    Args:
        name (str): label in the table and folder name.
        config (str): config file (a path, or a name under ``configs/``).
        opts (list[str]): extra ``KEY VALUE`` overrides of this side.
    """

    name: str
    config: str
    opts: list[str] = field(default_factory=list)


def read_final_ap(metrics_json: str | os.PathLike) -> dict[str, float]:
    """The last ``bbox/AP`` and ``segm/AP`` (percent; NaN when absent) of a detectron2
    ``metrics.json``.

    Raises:
        ValueError: the file holds no COCO box AP (the run did not evaluate).
    """
    found: dict[str, float] = {}
    with open(metrics_json) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                for short, key in _AP_KEYS.items():
                    if key in record:
                        found[short] = float(record[key])
    if "box" not in found:
        raise ValueError(f"{metrics_json}: no COCO evaluation result (bbox/AP) in it")
    found.setdefault("segm", math.nan)
    return found


def _dataset_args(data: Sequence[str] | None, datasets: Sequence[str] | None) -> list[str]:
    if data is not None:
        train_json, train_images, test_json, test_images = data
        return ["--register-coco", TRAIN_NAME, str(train_json), str(train_images),
                "--register-coco", TEST_NAME, str(test_json), str(test_images),
                "DATASETS.TRAIN", f"('{TRAIN_NAME}',)", "DATASETS.TEST", f"('{TEST_NAME}',)"]
    if datasets is not None:
        train, test = datasets
        return ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)"]
    return []


def run_one(spec: RunSpec, seed: int, iters: int, out_dir: str | os.PathLike,
            dataset_args: Sequence[str] = (), common_opts: Sequence[str] = (),
            python: str = sys.executable) -> dict:
    """Train and evaluate one (config, seed) with ``tools/train_net.py``; reuse a finished run.

    Args:
        spec (RunSpec): the config and its overrides.
        seed (int): ``SEED``.
        iters (int): ``SOLVER.MAX_ITER``.
        out_dir (str | PathLike): the run's ``OUTPUT_DIR`` (its log: ``train.log``).
        dataset_args (sequence[str]): ``--register-coco`` arguments and ``DATASETS.*`` overrides.
        common_opts (sequence[str]): overrides of both sides (applied before ``spec.opts``).
        python (str): the interpreter.

    Returns:
        dict: ``name``, ``seed``, ``box``, ``segm`` (AP in percent), ``seconds``, ``out_dir``.

    Raises:
        RuntimeError: the run failed (the message names its log).
    """
    out = Path(out_dir)
    result_path = out / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(REPO / "tools" / "train_net.py"), "--config", spec.config,
           *dataset_args, *common_opts, *spec.opts,
           "SOLVER.MAX_ITER", str(iters), "SEED", str(seed), "OUTPUT_DIR", str(out),
           # Only the final weights: no intermediate checkpoints within the budget.
           "SOLVER.CHECKPOINT_PERIOD", str(max(iters, 1) * 10)]
    log_path = out / "train.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{spec.name} seed {seed} failed (exit code {code}); log: {log_path}")
    ap = read_final_ap(out / "metrics.json")
    result = {"name": spec.name, "config": spec.config, "opts": list(spec.opts), "seed": seed,
              "iters": iters, "box": ap["box"], "segm": ap["segm"],
              "seconds": round(seconds, 1), "out_dir": str(out)}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)
    return result


def _describe(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if a.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def summarize(results: Sequence[dict], names: Sequence[str]) -> dict:
    """Mean, sample std, min, max of box/segm AP and seconds per side, and B - A of the means.

    Args:
        results (sequence[dict]): ``run_one`` results.
        names (sequence[str]): the two sides, in table order.
    """
    summary: dict = {"sides": {}}
    for name in names:
        rows = [r for r in results if r["name"] == name]
        summary["sides"][name] = {
            metric: _describe([r[metric] for r in rows]) for metric in ("box", "segm", "seconds")
        }
        summary["sides"][name]["seeds"] = [r["seed"] for r in rows]
    if len(names) == 2:
        a, b = (summary["sides"][n] for n in names)
        summary["difference"] = {m: b[m]["mean"] - a[m]["mean"] for m in ("box", "segm")}
    return summary


def _cell(d: dict) -> str:
    if d["n"] == 0:
        return "n/a"
    return f"{d['mean']:.1f} ± {d['std']:.1f} ({d['min']:.1f}-{d['max']:.1f})"


def format_table(summary: dict) -> str:
    """A markdown table of ``summarize``'s result (AP: mean ± std (min-max) over seeds)."""
    lines = ["| config | seeds | box AP | segm AP | seconds/run |",
             "|---|---|---|---|---|"]
    for name, side in summary["sides"].items():
        seconds = side["seconds"]["mean"]
        lines.append(f"| {name} | {len(side['seeds'])} | {_cell(side['box'])} | "
                     f"{_cell(side['segm'])} | {seconds:.0f} |")
    if "difference" in summary:
        names = list(summary["sides"])
        diff = summary["difference"]
        lines.append(f"| {names[1]} - {names[0]} (means) | | {diff['box']:+.1f} | "
                     f"{diff['segm']:+.1f} | |")
    return "\n".join(lines)


def compare(specs: Sequence[RunSpec], seeds: Sequence[int], iters: int, out_dir: str | os.PathLike,
            data: Sequence[str] | None = None, datasets: Sequence[str] | None = None,
            common_opts: Sequence[str] = (), log=print) -> dict:
    """Run every (spec, seed), seeds outermost (a partial comparison stays balanced), and write
    ``OUT/results.json`` (every run and the summary) and ``OUT/summary.md`` (the table).

    Args:
        specs (sequence[RunSpec]): the sides (two for a comparison; names must differ).
        seeds (sequence[int]): the seeds of every side.
        iters (int): iterations of every run.
        out_dir (str | PathLike): output folder; run folders are ``OUT/<name>/seed<k>``.
        data (sequence[str] | None): TRAIN_JSON TRAIN_IMAGES TEST_JSON TEST_IMAGES.
        datasets (sequence[str] | None): already registered TRAIN and TEST names instead.
        common_opts (sequence[str]): overrides of both sides.
        log (callable): progress messages.

    Returns:
        dict: ``runs`` and ``summary``.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"config names must differ, got {names}")
    out = Path(out_dir)
    dataset_args = _dataset_args(data, datasets)
    results = []
    for seed in seeds:
        for spec in specs:
            result = run_one(spec, seed, iters, out / spec.name / f"seed{seed}", dataset_args,
                             common_opts)
            log(f"{spec.name} seed {seed}: box AP {result['box']:.1f}, "
                f"segm AP {result['segm']:.1f}, {result['seconds']:.0f} s")
            results.append(result)
    summary = summarize(results, names)
    table = format_table(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"runs": results, "summary": summary,
                                                  "iters": iters, "seeds": list(seeds)},
                                                 indent=1))
    (out / "summary.md").write_text(table + "\n")
    log(table)
    return {"runs": results, "summary": summary}


def write_smoke_coco(root: str | os.PathLike, num_images: int = 4, size: int = 96,
                     seed: int = 0) -> tuple[str, str]:
    """A tiny generated COCO instance-segmentation set (bright ellipses on a dark background,
    RLE masks, one category) for the tool's ``--smoke`` mode.

    Returns:
        (json_path, image_dir)
    """
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    images, anns = [], []
    for image_id in range(1, num_images + 1):
        canvas = rng.normal(30, 5, (size, size))
        for _ in range(int(rng.integers(2, 5))):
            cy, cx = rng.uniform(16, size - 16, 2)
            ry, rx = rng.uniform(6, 14, 2)
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            canvas[mask] = rng.uniform(150, 250)
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            ys, xs = np.nonzero(mask)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1,
                         "segmentation": rle, "area": int(mask.sum()), "iscrowd": 0,
                         "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1,
                                  int(np.ptp(ys)) + 1]})
        name = f"{image_id:03d}.png"
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).convert("RGB").save(
            image_dir / name)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    json_path = root / "annotations.json"
    json_path.write_text(json.dumps({"images": images, "annotations": anns,
                                     "categories": [{"id": 1, "name": "blob"}]}))
    return str(json_path), str(image_dir)
