"""``tools/benchmark.py shards``: the pretraining data formats compared (``DATA.FORMAT``).

1. Loader throughput on the same images (generated JPEGs, ``benchmarks.data.make_benchmark_images``)
   stored three ways: an ImageNet-layout folder, a file list of it, and WebDataset shards written
   by ``write_shards`` (``tools/make_shards.py``). Each case is the trainer's own train loader
   (``build_dataset`` + ``build_train_loader``, ``--workers`` loader workers) over one pass of
   ``--num-images`` images, in two settings: ``decode`` (read and decode only: a transform that
   drops the image, no batch stage) and ``F0`` (the F0 recipe's per-image transform and batch
   stage: what training pays). Passes are interleaved across formats; medians.
2. Resident memory of the dataset index for ``--index-entries`` (default 10 million) entries: a
   file list (synthetic ``train/<wnid>/<wnid>_<n>.JPEG label`` lines) read into the
   ``ClassificationDataset`` the file-list format builds, and the shard index of the same number
   of samples (an ``info.json`` listing ``entries / 1000`` shards, the files empty). Each is built
   in a fresh process: its RSS growth once built, the peak RSS growth while building, and the
   bytes of the index's arrays.

``benchmark_formats(args)`` returns the figures (``tools/benchmark.py data`` can call it too).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time

import numpy as np
import torch

from .harness import add_common_arguments, describe_machine, format_table, write_json

__all__ = ["add_shards_arguments", "benchmark_formats", "measure_index_memory", "main_shards"]

FORMATS = ("folder", "filelist", "wds")


def add_shards_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``benchmark.py shards`` to ``parser``."""
    parser.add_argument("--num-images", type=int, default=512,
                        help="generated JPEGs read per pass (default 512)")
    parser.add_argument("--image-size", default="500x375", metavar="WxH",
                        help="source image size (default 500x375, ImageNet's most common)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per loader batch")
    parser.add_argument("--shard-size", type=int, default=128, help="images per shard")
    parser.add_argument("--workers", type=int, default=0,
                        help="loader workers (default 0: the main process, one thread)")
    parser.add_argument("--index-entries", type=int, default=10_000_000,
                        help="entries of the index memory comparison (default 10 million)")
    parser.add_argument("--data-dir", default="", help="where to write (default: a temp folder)")
    add_common_arguments(parser, repeats=3, warmup=1)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _drop_image(image, seed=None) -> torch.Tensor:
    return torch.zeros(())


def _no_collate(samples):
    return len(samples)


def _loader(fmt: str, root: str, setting: str, args) -> tuple:
    from ..classification.config import load_pretrain_cfg
    from ..classification.data import build_dataset, build_train_loader
    from ..classification.transforms import build_train_transform

    split = {"folder": "train", "filelist": "train.txt", "wds": "shards"}[fmt]
    opts = ["DATA.FORMAT", fmt, "DATA.ROOT", root, "DATA.TRAIN_SPLIT", split,
            "DATA.VAL_SPLIT", "", "MODEL.NUM_CLASSES", "1000",
            "SOLVER.IMS_PER_BATCH", str(args.batch_size), "DATA.NUM_WORKERS", str(args.workers)]
    if setting == "decode":
        opts += ["INPUT.MIXUP_ALPHA", "0.0", "INPUT.CUTMIX_ALPHA", "0.0"]
    cfg = load_pretrain_cfg("nfnet_f0_imagenet", opts)
    if setting == "decode":
        dataset = build_dataset(cfg, "train", _drop_image)
        loader, sampler = build_train_loader(cfg, dataset, 0, 1, 0, collate_fn=_no_collate)
    else:
        dataset = build_dataset(cfg, "train", build_train_transform(cfg))
        loader, sampler = build_train_loader(cfg, dataset, 0, 1, 0)
    return loader, sampler


def _time_pass(loader, sampler, data_pass: int) -> tuple[float, int]:
    """Seconds for one pass and the source images it read."""
    sampler.set_epoch(data_pass)
    images = len(sampler) * sampler.micro_sources
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start, images


def _write_index_sources(tmp: str, entries: int) -> tuple[str, str]:
    """A synthetic file list of ``entries`` lines and a shard folder of ``entries`` samples."""
    list_path = os.path.join(tmp, "big.txt")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, entries)
    wnids = [f"n{10_000_000 + 7919 * c:08d}" for c in range(1000)]
    with open(list_path, "w") as f:
        chunk = 100_000
        for begin in range(0, entries, chunk):
            f.write("".join(f"train/{wnids[c]}/{wnids[c]}_{i}.JPEG {c}\n"
                            for i, c in enumerate(labels[begin:begin + chunk], begin)))
    shard_dir = os.path.join(tmp, "big_shards")
    os.makedirs(shard_dir, exist_ok=True)
    per = 1000
    shards = []
    for s in range((entries + per - 1) // per):
        name = f"train-{s:06d}.tar"
        open(os.path.join(shard_dir, name), "wb").close()
        shards.append({"file": name, "num_samples": min(per, entries - s * per)})
    with open(os.path.join(shard_dir, "info.json"), "w") as f:
        json.dump({"num_samples": entries, "num_classes": 1000, "classes": None,
                   "shards": shards}, f)
    return list_path, shard_dir


def _index_worker(kind: str, path: str, queue) -> None:
    from ..classification.data import ClassificationDataset, read_file_list
    from ..classification.shards import ShardedDataset, resolve_shards

    base = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if kind == "filelist":
        paths, labels = read_file_list(path)
        index = ClassificationDataset(os.path.dirname(path), paths, labels, _drop_image)
        del paths, labels
        arrays = (index._paths._buffer.nbytes + index._paths._offsets.nbytes
                  + index.labels.nbytes)
    else:
        spec = resolve_shards(path)
        index = ShardedDataset(spec, spec.num_samples, _drop_image, 1000)
        arrays = sum(len(p) for p in spec.paths) + 8 * 2 * len(spec.paths)
    seconds = time.perf_counter() - start
    import gc

    gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put({"format": kind, "entries": len(index), "build_s": seconds,
               "rss_growth_bytes": _rss_bytes() - base,
               "peak_growth_bytes": max(peak - max(peak_before, base), 0),
               "index_array_bytes": arrays})


def measure_index_memory(entries: int, tmp: str) -> list[dict]:
    """Resident memory of a file-list index and a shard index of ``entries`` samples, each
    built in a fresh process (see the module docstring)."""
    list_path, shard_dir = _write_index_sources(tmp, entries)
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for kind, path in (("filelist", list_path), ("wds", shard_dir)):
        queue = ctx.Queue()
        proc = ctx.Process(target=_index_worker, args=(kind, path, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    return rows


def benchmark_formats(args: argparse.Namespace) -> dict:
    """Run both comparisons; returns their figures."""
    from ..classification.data import write_file_list
    from ..classification.shards import write_shards
    from .data import make_benchmark_images

    torch.set_num_threads(max(1, args.threads or 1))
    if args.smoke:
        args.num_images, args.batch_size, args.shard_size = 16, 4, 4
        args.repeats, args.warmup, args.image_size = 1, 0, "160x120"
        args.index_entries = min(args.index_entries, 20_000)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = make_benchmark_images(args.data_dir or tmp, args.num_images, width, height)
        if not os.path.isfile(os.path.join(root, "train.txt")):
            write_file_list(os.path.join(root, "train"), os.path.join(root, "train.txt"))
        if not os.path.isfile(os.path.join(root, "shards", "info.json")):
            write_shards(os.path.join(root, "train"), os.path.join(root, "shards"),
                         shard_size=args.shard_size, progress=False)
        times: dict[str, list[float]] = {}
        counts: dict[str, int] = {}
        for setting in ("decode", "F0"):
            loaders = {fmt: _loader(fmt, root, setting, args) for fmt in FORMATS}
            for r in range(args.warmup + args.repeats):
                for fmt, (loader, sampler) in loaders.items():
                    t, images = _time_pass(loader, sampler, r)
                    if r >= args.warmup:
                        times.setdefault(f"{setting} {fmt}", []).append(t)
                        counts[f"{setting} {fmt}"] = images
            del loaders
        rows = []
        for key, values in times.items():
            setting, fmt = key.split(" ")
            median = float(np.median(values))
            rows.append({"setting": setting, "format": fmt, "pass_s": median,
                         "source_images": counts[key], "images_per_s": counts[key] / median})
        index_rows = measure_index_memory(args.index_entries, tmp)
    return {"benchmark": "shards", "machine": describe_machine(torch.device("cpu")),
            "num_images": args.num_images, "image_size": [width, height],
            "batch_size": args.batch_size, "shard_size": args.shard_size,
            "workers": args.workers, "throughput": rows, "index": index_rows}


def main_shards(args: argparse.Namespace) -> dict:
    """Entry point of ``benchmark.py shards``: run, print tables, optionally write JSON."""
    r = benchmark_formats(args)
    m = r["machine"]
    print(f"Train loader over {r['num_images']} JPEGs of {r['image_size'][0]}x"
          f"{r['image_size'][1]} ({m['cpu']}, {m['cpu_count']} cores; {r['workers']} loader "
          f"workers, batches of {r['batch_size']}, shards of {r['shard_size']}); medians")
    print(format_table(["setting", "format", "pass s", "images/s"],
                       [[x["setting"], x["format"], f"{x['pass_s']:.2f}",
                         f"{x['images_per_s']:.1f}"] for x in r["throughput"]]))
    print(f"Dataset index of {r['index'][0]['entries']:,} entries (fresh process each)")
    mib = 2.0 ** 20
    print(format_table(["format", "RSS growth MiB", "peak growth MiB", "index arrays MiB",
                        "build s"],
                       [[x["format"], f"{x['rss_growth_bytes'] / mib:.1f}",
                         f"{x['peak_growth_bytes'] / mib:.1f}",
                         f"{x['index_array_bytes'] / mib:.2f}", f"{x['build_s']:.1f}"]
                        for x in r["index"]]))
    if args.json:
        write_json(args.json, r)
    return r
