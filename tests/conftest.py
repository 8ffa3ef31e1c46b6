"""Shared pytest fixtures."""

from __future__ import annotations

import json
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
