"""Look at training batches before training: ``tools/visualize_augmentation.py``.

The batches come from the trainer's own loader code (``build_dataset``, ``build_train_loader``,
``transforms.build_train_collate``), so every tile is a training example exactly as the model
receives it: after the crop, flip, resize, MixUp/CutMix and RandAugment, as uint8 before the
device's normalization (which is all "un-normalized" means here). Only the batch size differs:
``per_batch`` examples per batch instead of ``SOLVER.IMS_PER_BATCH``; with ``SEED >= 0`` the first
batch's sources are the first ones of the training run's data order at that batch size.

The grid has one row per batch (wrapped at ``columns``); under each tile, its two labels (class
names when the dataset has them: folder datasets) and their weights. ``--dump DIR`` writes every
tile as its own PNG (the exact pixels, no annotation) plus ``tiles.json`` with the labels and
ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..config import ConfigError
from .config import load_pretrain_cfg
from .data import build_dataset, build_train_loader
from .mixing import MixedBatch
from .transforms import build_train_collate, build_train_transform

__all__ = [
    "LABEL_BAND",
    "MIN_CELL_WIDTH",
    "sample_batches",
    "label_text",
    "make_grid",
    "dump_tiles",
    "visualize_argument_parser",
    "main",
]

logger = logging.getLogger(__name__)

# Grid cells: the tile, then a band of this height with its two label lines; cells are at least
# this wide so that the labels of small tiles stay readable.
LABEL_BAND = 26
MIN_CELL_WIDTH = 120


def sample_batches(cfg, num_batches: int, per_batch: int) -> tuple[list[MixedBatch], list | None,
                                                                   int]:
    """The first ``num_batches`` training batches of ``per_batch`` examples, as the trainer's
    loader makes them.

    Args:
        cfg (CfgNode): a pretraining config (``DATA.*``, ``INPUT.*``, ``SEED``).
        num_batches (int): batches to draw.
        per_batch (int): training examples per batch (even with MixUp and CutMix on).

    Returns:
        tuple: (batches, class names or None, the seed used).
    """
    cfg = cfg.clone()
    cfg.defrost()
    seed = cfg.SEED if cfg.SEED >= 0 else int.from_bytes(os.urandom(4), "little") % 2**31
    cfg.SOLVER.IMS_PER_BATCH = per_batch
    cfg.SOLVER.ACCUM_STEPS = 1
    cfg.DATA.NUM_WORKERS = 0
    dataset = build_dataset(cfg, "train", build_train_transform(cfg))
    loader, sampler = build_train_loader(cfg, dataset, 0, 1, seed,
                                         collate_fn=build_train_collate(cfg))
    batches: list[MixedBatch] = []
    data_pass = 0
    while len(batches) < num_batches:
        sampler.set_epoch(data_pass)
        data_pass += 1
        for batch in loader:
            batches.append(batch)
            if len(batches) == num_batches:
                break
    return batches, dataset.classes, seed


def _name(label: int, classes: Sequence[str] | None) -> str:
    return classes[label] if classes is not None and 0 <= label < len(classes) else str(label)


def label_text(label: int, mix_label: int, ratio: float,
               classes: Sequence[str] | None) -> tuple[str, str]:
    """The two annotation lines of a tile: first label and its weight, partner and its weight
    (the partner line is "-" for an unmixed example)."""
    first = f"{_name(label, classes)} {ratio:.2f}"
    if ratio >= 1.0:
        return first, "-"
    return first, f"{_name(mix_label, classes)} {1.0 - ratio:.2f}"


def make_grid(batches: Sequence[MixedBatch], classes: Sequence[str] | None = None,
              columns: int | None = None) -> Image.Image:
    """One RGB image of every tile of ``batches`` with its labels.

    Args:
        batches (sequence[MixedBatch]): uint8 (b, 3, S, S) images with labels and ratios.
        classes (sequence[str] | None): class names, indexed by label.
        columns (int | None): tiles per row (default: one row per batch).

    Returns:
        PIL.Image.Image: ``columns * max(S, MIN_CELL_WIDTH)`` wide and
        ``rows * (S + LABEL_BAND)`` high, white background.
    """
    tiles = [(img, int(a), int(b), float(r)) for batch in batches
             for img, a, b, r in zip(batch.images, batch.labels, batch.mix_labels, batch.ratio)]
    if not tiles:
        raise ValueError("make_grid: no tiles")
    size = tiles[0][0].shape[-1]
    columns = columns or len(batches[0].images)
    rows = math.ceil(len(tiles) / columns)
    cell_w, cell_h = max(size, MIN_CELL_WIDTH), size + LABEL_BAND
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, label, mix_label, ratio) in enumerate(tiles):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        grid.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (x, y))
        for line, text in enumerate(label_text(label, mix_label, ratio, classes)):
            draw.text((x + 2, y + size + 1 + 12 * line), text, fill=(0, 0, 0), font=font)
    return grid


def dump_tiles(batches: Sequence[MixedBatch], folder: str,
               classes: Sequence[str] | None = None) -> list[str]:
    """Write every tile as ``batchBBB_tileTTT.png`` (its exact pixels) and ``tiles.json`` (file,
    labels, class names, ratio per tile) into ``folder``; returns the PNG paths."""
    os.makedirs(folder, exist_ok=True)
    paths, index = [], []
    for b, batch in enumerate(batches):
        for t, (image, label, mix_label, ratio) in enumerate(
                zip(batch.images, batch.labels, batch.mix_labels, batch.ratio)):
            name = f"batch{b:03d}_tile{t:03d}.png"
            path = os.path.join(folder, name)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
            paths.append(path)
            index.append({"file": name, "label": int(label), "mix_label": int(mix_label),
                          "class": _name(int(label), classes),
                          "mix_class": _name(int(mix_label), classes), "ratio": float(ratio)})
    with open(os.path.join(folder, "tiles.json"), "w") as f:
        json.dump(index, f, indent=1)
    return paths


def visualize_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Draw training batches exactly as the model receives them (after the crop, "
        "MixUp/CutMix and RandAugment; before normalization), with each tile's two labels and "
        "ratio.",
        epilog="Example: tools/visualize_augmentation.py --config nfnet_f3_imagenet.yaml "
        "DATA.ROOT /data/imagenet --out f3_batches.png --dump f3_tiles",
    )
    parser.add_argument("--config-file", "--config", dest="config_file", required=True,
                        metavar="FILE", help="a pretraining yaml, or a name under configs/")
    parser.add_argument("--out", required=True, help="the grid PNG to write")
    parser.add_argument("--dump", default="", metavar="DIR",
                        help="also write every tile as its own PNG (and tiles.json) here")
    parser.add_argument("--batches", type=int, default=2, help="batches to draw (default 2)")
    parser.add_argument("--per-batch", type=int, default=8,
                        help="training examples per batch (default 8; even with MixUp+CutMix)")
    parser.add_argument("--columns", type=int, default=0,
                        help="tiles per row (default: one row per batch)")
    parser.add_argument("opts", nargs="*", default=[], metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs (anywhere on the line)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/visualize_augmentation.py``; config errors exit with status 2."""
    parser = visualize_argument_parser()
    # Overrides may sit between options: --config F KEY VALUE --out G.
    args = parser.parse_intermixed_args(argv)
    if args.batches < 1 or args.per_batch < 1:
        parser.error("--batches and --per-batch must be >= 1")
    try:
        cfg = load_pretrain_cfg(args.config_file, args.opts)
    except (FileNotFoundError, ConfigError) as e:
        parser.error(str(e))
    try:
        batches, classes, seed = sample_batches(cfg, args.batches, args.per_batch)
    except ValueError as e:  # e.g. an odd --per-batch with both mixings on
        parser.error(str(e))
    grid = make_grid(batches, classes, args.columns or None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    tiles = sum(len(b.images) for b in batches)
    print(f"Wrote {args.out}: {tiles} training examples in {len(batches)} batch(es), "
          f"{grid.width}x{grid.height} px (seed {seed})")
    if args.dump:
        paths = dump_tiles(batches, args.dump, classes)
        print(f"Wrote {len(paths)} tiles and tiles.json to {args.dump}")
    flat = [i for i, img in enumerate(torch.cat([b.images for b in batches]))
            if bool((img == img[:, :1, :1]).all())]
    if flat:
        print(f"Note: {len(flat)} tile(s) are a single flat color (tiles {flat}); see "
              "docs/pretraining_pipeline.md on RandAugment saturation", file=sys.stderr)
    return 0
