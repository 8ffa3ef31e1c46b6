"""Shared pytest fixtures (plain helpers: helpers.py)."""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from nfdet.data.validate import polygon_area

TINY_COCO_CATEGORIES = ({"id": 1, "name": "rectangle"}, {"id": 2, "name": "circle"})


def write_tiny_coco(root: Path, num_images: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """Write a COCO instance-segmentation set of 64-128 px images with 1-3 filled rectangles or
    circles each; every mask is the drawn polygon (pycocotools-compatible).

    Returns:
        (json_path, image_dir)
    """
    rng = random.Random(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = rng.randint(64, 128), rng.randint(64, 128)
        img = Image.new("RGB", (width, height), tuple(rng.randint(0, 60) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 3)):
            category = rng.choice(TINY_COCO_CATEGORIES)["id"]
            size = rng.randint(16, min(width, height) // 2)
            x0, y0 = rng.randint(0, width - size - 1), rng.randint(0, height - size - 1)
            if category == 1:
                h = rng.randint(size // 2, size)
                points = [(x0, y0), (x0 + size, y0), (x0 + size, y0 + h), (x0, y0 + h)]
            else:
                r, cx, cy = size / 2, x0 + size / 2, y0 + size / 2
                angles = [2 * math.pi * k / 16 for k in range(16)]
                points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
            draw.polygon(points, fill=tuple(rng.randint(120, 255) for _ in range(3)))
            xy = [float(round(c, 2)) for p in points for c in p]
            xs, ys = xy[0::2], xy[1::2]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": [xy],
                    "area": polygon_area(xy),
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id:04d}.png"
        img.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    json_path = root / "annotations.json"
    json_path.write_text(
        json.dumps(
            {"images": images, "annotations": annotations, "categories": list(TINY_COCO_CATEGORIES)}
        )
    )
    return json_path, image_dir


@pytest.fixture
def tiny_coco(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny COCO-format dataset written to ``tmp_path/coco``: (json_path, image_dir)."""
    return write_tiny_coco(tmp_path / "coco")


@pytest.fixture
def nfdet_log():
    """Messages of the "nfdet" loggers, joined by newlines (a handler on the logger itself: a
    trainer run earlier in the session may have stopped them from propagating to pytest's
    caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("nfdet")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield lambda: "\n".join(r.getMessage() for r in records)
    log.removeHandler(handler)
    log.setLevel(level)


_dataset_names = itertools.count()


@pytest.fixture
def register_coco():
    """``register_coco(prefix, json_path, image_dir) -> name``: registers a COCO file through
    nfdet's checked loader under a name unique to the session; removed after the test."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from nfdet.detection.data import register_checked_coco

    names: list[str] = []

    def register(prefix: str, json_path: Path, image_dir: Path) -> str:
        name = f"{prefix}_{next(_dataset_names)}"
        register_checked_coco(name, str(json_path), str(image_dir))
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
