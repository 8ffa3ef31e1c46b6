"""A small real instance-segmentation set: the DSB2018 nuclei image of the ``stardist`` wheel.

The ``stardist`` wheel on PyPI ships one fluorescence image of cell nuclei from the 2018 Data
Science Bowl and its label mask (``stardist/data/images/img2d.tif`` and ``mask2d.tif``: 512x512,
16-bit, one integer label per nucleus). ``make_nuclei_coco`` turns them into a COCO-format set:

- intensities rescaled linearly from the image's (min, max) to 0-255 (8-bit grayscale PNGs);
- four 256x256 tiles (row-major: top-left, top-right, bottom-left, bottom-right); the first three
  are the training split, the bottom-right tile is held out;
- one annotation per label present in a tile (a nucleus cut by a tile border becomes one instance
  in each tile), with an RLE mask (train with ``INPUT.MASK_FORMAT bitmask``); fragments smaller
  than ``min_area`` pixels are dropped. With the defaults: 108 training and 28 held-out nuclei.

Nothing is downloaded here: get the wheel with ``pip download stardist --no-deps -d DIR`` and
pass it (or the two extracted TIFFs) to ``tools/make_nuclei_data.py``.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["read_stardist_wheel", "read_tiff", "make_nuclei_coco", "NUCLEI_WHEEL_MEMBERS"]

# Paths of the image and its label mask inside the stardist wheel.
NUCLEI_WHEEL_MEMBERS = ("stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif")
TILE = 256


def read_tiff(source: str | os.PathLike | io.BytesIO, what: str) -> np.ndarray:
    """Read a single-channel (8/16-bit) TIFF as a 2-D numpy array.

    Args:
        source (str | PathLike | BytesIO): the file.
        what (str): how to name it in an error.

    Raises:
        ValueError: the file is not a readable 2-D image.
    """
    try:
        with Image.open(source) as img:
            array = np.array(img)
    except OSError as e:
        raise ValueError(f"{what}: not a readable TIFF image ({e})") from None
    if array.ndim != 2:
        raise ValueError(f"{what}: expected a single-channel 2-D image, got shape {array.shape}")
    return array


def read_stardist_wheel(wheel: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The nuclei image and label mask from a ``stardist`` wheel (a zip file).

    Args:
        wheel (str | PathLike): path of ``stardist-*.whl``.

    Returns:
        (image, labels): two 2-D arrays.

    Raises:
        ValueError: not a zip file, or it lacks ``NUCLEI_WHEEL_MEMBERS``.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{wheel}: not a readable wheel (zip) file ({e})") from None
    with archive:
        names = set(archive.namelist())
        missing = [m for m in NUCLEI_WHEEL_MEMBERS if m not in names]
        if missing:
            raise ValueError(f"{wheel}: has no {', '.join(missing)} (is it the stardist wheel?)")
        image, labels = (
            read_tiff(io.BytesIO(archive.read(m)), f"{wheel}:{m}") for m in NUCLEI_WHEEL_MEMBERS
        )
    return image, labels


def _to_uint8(image: np.ndarray) -> np.ndarray:
    # Linear rescale of the image's own range to 0-255.
    lo, hi = float(image.min()), float(image.max())
    scaled = (image.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _annotations(labels: np.ndarray, image_id: int, first_id: int, min_area: int) -> list[dict]:
    from pycocotools import mask as mask_util

    anns = []
    for label in np.unique(labels):
        if label == 0:
            continue
        mask = labels == label
        area = int(mask.sum())
        if area < min_area:
            continue
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        anns.append({
            "id": first_id + len(anns),
            "image_id": image_id,
            "category_id": 1,
            "segmentation": rle,
            "area": area,
            "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
            "iscrowd": 0,
        })
    return anns


def make_nuclei_coco(image: np.ndarray, labels: np.ndarray, out_dir: str | os.PathLike,
                     min_area: int = 10) -> dict[str, str]:
    """Write the nuclei set (see the module docstring) under ``out_dir``.

    Layout: ``train/``, ``val/`` (PNG tiles) and ``train.json``, ``val.json``.

    Args:
        image (ndarray): the 2-D intensity image (any integer or float type).
        labels (ndarray): the 2-D label mask of the same shape (0 background).
        out_dir (str | PathLike): output folder (created).
        min_area (int): drop instance fragments with fewer pixels.

    Returns:
        dict: ``train_json``, ``train_images``, ``val_json``, ``val_images`` paths.

    Raises:
        ValueError: the shapes differ or are not 512x512.
    """
    if image.shape != labels.shape or image.shape != (2 * TILE, 2 * TILE):
        raise ValueError(f"image {image.shape} and labels {labels.shape} must both be "
                         f"{2 * TILE}x{2 * TILE}")
    out = Path(out_dir)
    pixels = _to_uint8(image)
    paths: dict[str, str] = {}
    splits = {"train": [(0, 0), (0, 1), (1, 0)], "val": [(1, 1)]}
    for split, tiles in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for image_id, (r, c) in enumerate(tiles, start=1):
            window = np.s_[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            name = f"tile_{r}{c}.png"
            Image.fromarray(pixels[window], mode="L").save(out / split / name)
            images.append({"id": image_id, "file_name": name, "width": TILE, "height": TILE})
            anns.extend(_annotations(labels[window], image_id, len(anns) + 1, min_area))
        json_path = out / f"{split}.json"
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({
            "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "nucleus"}],
        }))
        os.replace(tmp, json_path)
        paths[f"{split}_json"], paths[f"{split}_images"] = str(json_path), str(out / split)
    return paths
