"""``tools/benchmark.py data``: throughput of the pretraining input pipeline per loader worker.

One process on one torch thread plays one DataLoader worker (workers run single-threaded) over a
generated folder of natural-looking JPEGs of ImageNet's most common size (500 x 375: drawn shapes
on textured backgrounds, ``nfdet.data.synthetic``). Per variant config
(``configs/pretrain/nfnet_<v>_imagenet.yaml``: F0 192 px with RandAugment 4 x 5, F3 320 px with
4 x 15, both with MixUp/CutMix), a batch of ``--batch-size`` training examples is timed in its two
stages, interleaved with the other cases:

- image stage: decode, Inception crop, flip and resize of each of the batch's source images (two
  per training example with mixing);
- batch stage: pairing (MixUp/CutMix), uint8 cast and RandAugment of each training example.

The result is training examples (and source images) per second per worker. ``--legacy-transforms
FILE`` also times an older ``nfdet/classification/transforms.py`` (e.g. ``git show
<commit>:nfdet/classification/transforms.py > old.py``) the way the trainer of that time ran it:
its per-image transform (crop, flip, RandAugment) under ``torch.manual_seed`` in the worker, one
source image per training example, and its ``mix_batch`` timed on its own (it ran in the training
process, on the device).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..classification.config import load_pretrain_cfg
from ..classification.data import EpochBatchSampler, build_dataset
from ..classification.transforms import build_train_collate, build_train_transform
from ..data.synthetic import CATEGORIES, SyntheticDataParams, render_classification_image
from ..data.validate import read_image_rgb
from .harness import (
    add_common_arguments,
    describe_machine,
    format_table,
    setup_device,
    time_interleaved,
    write_json,
)

__all__ = ["add_data_arguments", "make_benchmark_images", "benchmark_data", "main_data"]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``benchmark.py data`` to ``parser``."""
    parser.add_argument("--variants", default="F0,F3",
                        help="comma-separated variants whose pretraining configs are timed")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="training examples per timed batch (default 32)")
    parser.add_argument("--num-images", type=int, default=64,
                        help="generated source images (default 64)")
    parser.add_argument("--image-size", default="500x375", metavar="WxH",
                        help="source image size (default 500x375, ImageNet's most common)")
    parser.add_argument("--data-dir", default="",
                        help="where to write the images (default: a temporary folder)")
    parser.add_argument("--legacy-transforms", default="", metavar="FILE",
                        help="also time this older nfdet/classification/transforms.py")
    add_common_arguments(parser, repeats=5, warmup=1)


def make_benchmark_images(root: str, count: int, width: int, height: int) -> str:
    """Write ``count`` JPEGs (quality 90) of drawn shapes on textured backgrounds as a folder
    dataset ``root/train/<class>/``; returns ``root``."""
    params = SyntheticDataParams()
    side = max(width, height)
    for i in range(count):
        category = i % len(CATEGORIES)
        folder = os.path.join(root, "train", CATEGORIES[category])
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:05d}.jpg")
        if os.path.isfile(path):
            continue
        rng = np.random.default_rng([2024, i])
        image = render_classification_image(rng, category, side, params)[:height, :width]
        Image.fromarray(image).save(path, quality=90)
    return root


def _cycle_batches(sampler: EpochBatchSampler) -> itertools.cycle:
    sampler.set_epoch(0)
    return itertools.cycle(list(sampler))


def _current_cases(name: str, cfg) -> tuple[dict[str, Callable], int]:
    """Image-stage and batch-stage cases of the current pipeline; returns them and the sources
    per training example."""
    dataset = build_dataset(cfg, "train", build_train_transform(cfg))
    collate = build_train_collate(cfg)
    sources = collate.sources_per_example
    batches = _cycle_batches(EpochBatchSampler(len(dataset), cfg.SOLVER.IMS_PER_BATCH, 0, 1,
                                               seed=0, sources_per_example=sources))
    last: dict[str, list] = {}

    def image_stage() -> None:
        items = next(batches)
        last["samples"] = [(*dataset[item], item[1]) for item in items]

    def batch_stage() -> None:
        collate(last["samples"])

    image_stage()  # something for the first batch-stage call
    return {f"{name} image stage": image_stage, f"{name} batch stage": batch_stage}, sources


def _load_legacy(path: str):
    spec = importlib.util.spec_from_file_location("nfdet_legacy_transforms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for attr in ("build_train_transform", "mix_batch"):
        if not hasattr(module, attr):
            raise SystemExit(f"--legacy-transforms {path}: no {attr}()")
    return module


def _legacy_cases(name: str, cfg, legacy) -> dict[str, Callable]:
    """The older pipeline as its trainer ran it: worker = per-image transform under
    torch.manual_seed + stacking; training process = mix_batch on the normalized batch."""
    transform = legacy.build_train_transform(cfg)
    dataset = build_dataset(cfg, "train", transform)
    batches = _cycle_batches(EpochBatchSampler(len(dataset), cfg.SOLVER.IMS_PER_BATCH, 0, 1,
                                               seed=0))
    last: dict[str, torch.Tensor] = {}

    def worker() -> None:
        images = []
        for index, seed in next(batches):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # as its ClassificationDataset did
                images.append(transform(read_image_rgb(dataset.path(index))))
        last["images"] = torch.stack(images)

    worker()
    k = cfg.MODEL.NUM_CLASSES

    def mixing() -> None:
        x = last["images"].to(torch.float32)
        y = torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), k).float()
        legacy.mix_batch(x, y, cfg.INPUT.MIXUP_ALPHA, cfg.INPUT.CUTMIX_ALPHA,
                         np.random.default_rng(0))

    return {f"{name} legacy worker": worker, f"{name} legacy mix_batch": mixing}


def benchmark_data(args: argparse.Namespace) -> dict:
    """Run the data benchmark; return its figures."""
    device = setup_device(args)
    if device.type != "cpu":
        raise SystemExit("benchmark.py data measures CPU loader workers: use --device cpu")
    torch.set_num_threads(1)  # a DataLoader worker's setting
    if args.smoke:
        args.batch_size, args.num_images, args.repeats, args.warmup = 4, 8, 1, 1
        args.image_size = "160x120"
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    variants = [v.strip().upper() for v in args.variants.split(",") if v.strip()]
    legacy = _load_legacy(args.legacy_transforms) if args.legacy_transforms else None
    with tempfile.TemporaryDirectory() as tmp:
        root = make_benchmark_images(args.data_dir or tmp, args.num_images, width, height)
        cases: dict[str, Callable] = {}
        info = {}
        for variant in variants:
            cfg = load_pretrain_cfg(f"nfnet_{variant.lower()}_imagenet", [
                "DATA.ROOT", root, "MODEL.NUM_CLASSES", str(len(CATEGORIES)),
                "SOLVER.IMS_PER_BATCH", str(args.batch_size), "DATA.NUM_WORKERS", "0"])
            current, sources = _current_cases(variant, cfg)
            cases.update(current)
            if legacy is not None:
                cases.update(_legacy_cases(variant, cfg, legacy))
            ra = cfg.INPUT.RANDAUGMENT
            info[variant] = {"train_size": cfg.INPUT.TRAIN_SIZE, "sources_per_example": sources,
                             "randaugment": f"{ra.NUM_OPS} x {ra.MAGNITUDE}"}
        timings = time_interleaved(cases, args.repeats, args.warmup, device,
                                   log=print if args.verbose else None)
    rows = []
    b = args.batch_size
    for variant in variants:
        t = {k.split(" ", 1)[1]: v["median_s"] for k, v in timings.items()
             if k.startswith(variant + " ")}
        total = t["image stage"] + t["batch stage"]
        row = {"variant": variant, "pipeline": "current", **info[variant],
               "image_stage_s": t["image stage"], "batch_stage_s": t["batch stage"],
               "batch_s": total, "examples_per_s": b / total,
               "source_images_per_s": b * info[variant]["sources_per_example"] / total}
        rows.append(row)
        if legacy is not None:
            rows.append({"variant": variant, "pipeline": "legacy", **info[variant],
                         "sources_per_example": 1, "image_stage_s": t["legacy worker"],
                         "batch_stage_s": 0.0, "batch_s": t["legacy worker"],
                         "examples_per_s": b / t["legacy worker"],
                         "source_images_per_s": b / t["legacy worker"],
                         "main_process_mix_batch_s": t["legacy mix_batch"]})
    return {"benchmark": "data", "machine": describe_machine(device), "batch_size": b,
            "num_images": args.num_images, "image_size": [width, height],
            "legacy_transforms": args.legacy_transforms or None, "rows": rows,
            "timings": timings}


def main_data(args: argparse.Namespace) -> dict:
    """Entry point of ``benchmark.py data``: run, print a table, optionally write JSON."""
    r = benchmark_data(args)
    m = r["machine"]
    print(f"Input pipeline per loader worker (1 thread, {m['cpu']}, {m['cpu_count']} cores): "
          f"batches of {r['batch_size']} training examples from {r['num_images']} JPEGs of "
          f"{r['image_size'][0]}x{r['image_size'][1]}; medians")
    print(format_table(
        ["variant", "pipeline", "size", "RA", "image stage ms", "batch stage ms",
         "examples/s", "sources/s"],
        [[row["variant"], row["pipeline"], row["train_size"], row["randaugment"],
          f"{1e3 * row['image_stage_s']:.1f}", f"{1e3 * row['batch_stage_s']:.1f}",
          f"{row['examples_per_s']:.1f}", f"{row['source_images_per_s']:.1f}"]
         for row in r["rows"]],
    ))
    for row in r["rows"]:
        if "main_process_mix_batch_s" in row:
            print(f"{row['variant']} legacy: mix_batch in the training process "
                  f"{1e3 * row['main_process_mix_batch_s']:.1f} ms per batch (on CPU)")
    if args.json:
        write_json(args.json, r)
    return r
