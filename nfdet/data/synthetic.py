"""Deterministic synthetic datasets of drawn shapes, for the CPU demo and smoke tests.

Two datasets come from one seed:

- ``classification/{train,val}/<class>/*.png``: one shape per image (ImageNet folder layout), for
  pretraining a backbone;
- ``coco/{train,val}.json`` + ``coco/{train,val}/*.png``: COCO instance segmentation with 1 to N
  shapes per image, occlusion, textured backgrounds and exact RLE masks.

Every image draws its random numbers from its own stream, ``default_rng([seed, split, index])``,
so the held-out split never shares a stream with the training split, and the same parameters give
byte-identical files. Masks are exact: each shape is rasterised once into a binary mask, the image
is painted through that mask, and later shapes are subtracted from the masks of the earlier ones
they cover.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "CATEGORIES",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "SyntheticDataParams",
    "SyntheticData",
    "Scene",
    "render_scene",
    "render_classification_image",
    "make_synthetic_data",
    "synthetic_data_paths",
]

# Distinguishable by outline alone: colours are random and independent of the category.
CATEGORIES = ("circle", "rectangle", "triangle", "star")
# Bump whenever the drawing changes, so an old dataset is never mistaken for a new one.
GENERATOR_VERSION = 1
MANIFEST_NAME = "nfdet_synthetic_manifest.json"

# Independent random streams: default_rng([seed, stream, ...]).
_STREAM_COCO = {"train": 0, "val": 1}
_STREAM_CLS = {"train": 2, "val": 3}
_PLACEMENT_ATTEMPTS = 30
_COLOUR_ATTEMPTS = 30


@dataclass(frozen=True)
class SyntheticDataParams:
    """Parameters of a synthetic dataset; equal parameters give byte-identical files.

    Args:
        seed (int): master seed.
        num_train (int): detection training images.
        num_val (int): detection held-out images.
        image_size (tuple[int, int]): (min, max) side of detection images; height and width are
            drawn independently and uniformly in this range (equal values: fixed square size).
        object_size (tuple[int, int]): (min, max) of a shape's longer bounding-box side in px,
            before occlusion; drawn uniformly (so small shapes do not dominate).
        objects_per_image (tuple[int, int]): (min, max) shapes attempted per image. A shape that
            cannot be placed without hiding an earlier one too much is left out, but every image
            keeps at least one.
        min_visible (float): each annotated shape keeps at least this fraction of its own area
            visible after occlusion.
        min_contrast (float): wanted RGB distance between a shape's colour and what it is painted
            over (background mean and overlapped shapes).
        noise_std (tuple[float, float]): (min, max) std of the per-pixel noise of an image.
        cls_train_per_class (int): classification training images per class.
        cls_val_per_class (int): classification validation images per class.
        cls_image_size (int): side of the square classification images.
    """

    seed: int = 0
    num_train: int = 320
    num_val: int = 80
    image_size: tuple[int, int] = (256, 256)
    object_size: tuple[int, int] = (12, 128)
    objects_per_image: tuple[int, int] = (1, 6)
    min_visible: float = 0.25
    min_contrast: float = 80.0
    noise_std: tuple[float, float] = (2.0, 8.0)
    cls_train_per_class: int = 250
    cls_val_per_class: int = 50
    cls_image_size: int = 64

    def __post_init__(self):
        # Accept lists (from json / argparse) but store tuples, so equal params compare equal.
        for name in ("image_size", "object_size", "objects_per_image", "noise_std"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                value = (value, value)
            object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent parameter."""

        def fail(name: str, why: str) -> None:
            raise ValueError(f"SyntheticDataParams.{name}={getattr(self, name)!r}: {why}")

        for name in ("image_size", "object_size", "objects_per_image", "noise_std"):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                fail(name, "expected a (min, max) pair with min <= max")
        if not isinstance(self.seed, int) or self.seed < 0:
            fail("seed", "expected a non-negative integer")
        for name in ("num_train", "num_val", "cls_train_per_class", "cls_val_per_class"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                fail(name, "expected a non-negative integer")
        if self.image_size[0] < 16:
            fail("image_size", "images must be at least 16 px")
        if self.object_size[0] < 4:
            fail("object_size", "shapes must be at least 4 px")
        if self.object_size[1] > self.image_size[0]:
            fail("object_size", f"the largest shape must fit the smallest image {self.image_size}")
        if self.objects_per_image[0] < 1:
            fail("objects_per_image", "every image needs at least one shape")
        if not 0.0 < self.min_visible <= 1.0:
            fail("min_visible", "expected a fraction in (0, 1]")
        if self.min_contrast < 0 or self.noise_std[0] < 0:
            fail("min_contrast" if self.min_contrast < 0 else "noise_std", "must be >= 0")
        if self.cls_image_size < 16:
            fail("cls_image_size", "images must be at least 16 px")

    def to_dict(self) -> dict[str, Any]:
        """Plain json types (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyntheticDataParams:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown SyntheticDataParams keys: {unknown}")
        return cls(**d)


@dataclass
class Scene:
    """One rendered detection image.

    Args:
        image (np.ndarray): HxWx3 uint8 RGB.
        categories (list[int]): category index (0-based, into ``CATEGORIES``) per shape, in
            drawing order (later shapes lie on top).
        full_masks (list[np.ndarray]): HxW bool mask of each whole shape.
        visible_masks (list[np.ndarray]): HxW bool mask of what is left visible of each shape;
            these are pairwise disjoint and are what the annotations store.
    """

    image: np.ndarray
    categories: list[int]
    full_masks: list[np.ndarray]
    visible_masks: list[np.ndarray]


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _unit_outline(category: str, rng: np.random.Generator) -> np.ndarray:
    """Outline of a shape around the origin, radius about 1, as a (N, 2) float array."""
    if category == "circle":
        # Mild ellipses too; still smooth and corner-free.
        t = np.linspace(0.0, 2 * math.pi, 64, endpoint=False)
        aspect = rng.uniform(0.8, 1.0)
        return np.stack([np.cos(t), aspect * np.sin(t)], axis=1)
    if category == "rectangle":
        aspect = rng.uniform(0.5, 1.0)
        return np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]], dtype=np.float64)
    if category == "triangle":
        # Near-equilateral so that small triangles stay triangles.
        angles = math.pi / 2 + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.2, 0.2, size=3)
        radii = rng.uniform(0.9, 1.0, size=3)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if category == "star":
        inner = rng.uniform(0.4, 0.5)
        angles = math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def _shape_polygon(category: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """A randomly rotated outline scaled so that its longer bounding-box side spans ``size`` px.

    Returns the polygon with its bounding box starting at (0, 0).
    """
    pts = _unit_outline(category, rng)
    theta = rng.uniform(0.0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    pts = pts @ np.array([[c, s], [-s, c]])
    pts -= pts.min(axis=0)
    # A filled polygon whose vertices span E covers E + 1 pixel columns.
    pts *= (size - 1.0) / max(pts.max(axis=0).max(), 1e-6)
    return pts


def _rasterize(poly: np.ndarray, offset: tuple[float, float], height: int, width: int):
    """Binary mask of a polygon placed at ``offset`` (x, y); 1/16 px vertex precision."""
    mask = np.zeros((height, width), dtype=np.uint8)
    pts = np.round((poly + np.asarray(offset)) * 16.0).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured float32 HxWx3 background: base colour, low-frequency blotches, a pattern."""
    base = rng.uniform(40.0, 215.0, size=3)
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = base
    # Low-frequency colour blotches: a coarse random grid upsampled smoothly.
    gh, gw = rng.integers(2, 8, size=2)
    coarse = rng.normal(0.0, rng.uniform(8.0, 25.0), size=(gh, gw, 3)).astype(np.float32)
    img += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    kind = rng.integers(0, 4)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tint = rng.uniform(-1.0, 1.0, size=3).astype(np.float32)
    amplitude = rng.uniform(8.0, 22.0)
    if kind == 1:  # stripes
        angle = rng.uniform(0.0, math.pi)
        period = rng.uniform(6.0, 30.0)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
        img += (amplitude * np.sin(phase))[..., None] * tint
    elif kind == 2:  # checkerboard
        period = int(rng.integers(8, 33))
        checker = ((xx // period + yy // period) % 2) * 2.0 - 1.0
        img += (amplitude * checker)[..., None] * tint
    elif kind == 3:  # clutter: thin random lines (not objects)
        clutter = np.zeros((height, width), dtype=np.float32)
        for _ in range(int(rng.integers(3, 10))):
            p1 = tuple(int(v) for v in rng.integers(0, [width, height]))
            p2 = tuple(int(v) for v in rng.integers(0, [width, height]))
            sign = float(rng.choice([-1.0, 1.0]))
            cv2.line(clutter, p1, p2, sign, thickness=1, lineType=cv2.LINE_8)
        img += (amplitude * 1.5 * clutter)[..., None] * tint
    return img


def _pick_colour(
    rng: np.random.Generator, avoid: list[np.ndarray], min_contrast: float
) -> np.ndarray:
    """A random RGB colour at least ``min_contrast`` away from every colour in ``avoid`` (or the
    farthest of a few candidates when none is)."""
    best, best_dist = None, -1.0
    for _ in range(_COLOUR_ATTEMPTS):
        colour = rng.uniform(0.0, 255.0, size=3)
        dist = min((float(np.linalg.norm(colour - a)) for a in avoid), default=math.inf)
        if dist >= min_contrast:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    return best


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, rng: np.random.Generator):
    """Paint ``colour`` with a gentle linear shading through ``mask`` (in place, float canvas)."""
    ys, xs = np.nonzero(mask)
    direction = rng.normal(size=2)
    direction /= max(float(np.linalg.norm(direction)), 1e-6)
    extent = max(int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1)
    ramp = ((xs - xs.mean()) * direction[0] + (ys - ys.mean()) * direction[1]) / extent
    shade = rng.uniform(0.0, 30.0)
    canvas[ys, xs] = colour[None, :].astype(np.float32) + (shade * ramp)[:, None]


def _finish(canvas: np.ndarray, rng: np.random.Generator, noise_std: tuple[float, float]):
    sigma = rng.uniform(*noise_std)
    canvas += rng.normal(0.0, sigma, size=canvas.shape).astype(np.float32)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def render_scene(
    rng: np.random.Generator, params: SyntheticDataParams, height: int, width: int
) -> Scene:
    """Draw one detection image: a textured background and occluding shapes.

    Shapes are drawn in order; each one is placed (up to 30 tries) only where it leaves every
    earlier shape at least ``params.min_visible`` of its area visible, otherwise it is skipped.
    So every shape in the image is annotated, and the visible masks are exact and disjoint.

    Args:
        rng (np.random.Generator): the image's own random stream.
        params (SyntheticDataParams): drawing parameters.
        height (int): image height.
        width (int): image width.
    """
    canvas = _background(rng, height, width)
    lo, hi = params.object_size
    hi = min(hi, height, width)
    num = int(rng.integers(params.objects_per_image[0], params.objects_per_image[1] + 1))
    categories: list[int] = []
    full_masks: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    colours: list[np.ndarray] = []
    for _ in range(num):
        cat = int(rng.integers(len(CATEGORIES)))
        mask = None
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            poly = _shape_polygon(CATEGORIES[cat], rng.uniform(lo, hi), rng)
            span = poly.max(axis=0)
            offset = (rng.uniform(0.0, width - 1 - span[0]), rng.uniform(0.0, height - 1 - span[1]))
            candidate = _rasterize(poly, offset, height, width)
            if all(
                np.count_nonzero(v & ~candidate) >= params.min_visible * np.count_nonzero(f)
                for v, f in zip(visible, full_masks)
            ):
                mask = candidate
                break
        if mask is None:
            continue
        # Contrast against what the shape covers: the canvas mean and each overlapped shape.
        avoid = [canvas[mask].mean(axis=0)]
        avoid += [c for v, c in zip(visible, colours) if np.any(v & mask)]
        colour = _pick_colour(rng, avoid, params.min_contrast)
        _paint(canvas, mask, colour, rng)
        for v in visible:
            v &= ~mask
        categories.append(cat)
        full_masks.append(mask)
        visible.append(mask.copy())
        colours.append(colour)
    return Scene(_finish(canvas, rng, params.noise_std), categories, full_masks, visible)


def render_classification_image(
    rng: np.random.Generator, category: int, size: int, params: SyntheticDataParams
) -> np.ndarray:
    """Draw one shape of ``CATEGORIES[category]`` (30-90% of the image side) on a textured
    background; returns a ``size`` x ``size`` x 3 uint8 RGB image."""
    canvas = _background(rng, size, size)
    poly = _shape_polygon(CATEGORIES[category], rng.uniform(0.3, 0.9) * size, rng)
    span = poly.max(axis=0)
    offset = (rng.uniform(0.0, size - 1 - span[0]), rng.uniform(0.0, size - 1 - span[1]))
    mask = _rasterize(poly, offset, size, size)
    colour = _pick_colour(rng, [canvas[mask].mean(axis=0)], params.min_contrast)
    _paint(canvas, mask, colour, rng)
    return _finish(canvas, rng, params.noise_std)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _write_png(path: str, rgb: np.ndarray) -> None:
    if not cv2.imwrite(path, np.ascontiguousarray(rgb[:, :, ::-1])):
        raise OSError(f"could not write image {path}")


def _mask_annotation(mask: np.ndarray) -> dict[str, Any]:
    """COCO fields of a binary mask: compressed RLE (counts as str), area and xywh bbox."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
    return {"segmentation": rle, "area": int(np.count_nonzero(mask)), "bbox": bbox}


def _coco_split(root: str, split: str, num_images: int, params: SyntheticDataParams) -> dict:
    """Render and write one COCO split; returns the json dict (not yet written)."""
    image_dir = os.path.join(root, "coco", split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    lo, hi = params.image_size
    for index in range(num_images):
        rng = np.random.default_rng([params.seed, _STREAM_COCO[split], index])
        height, width = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        scene = render_scene(rng, params, height, width)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        _write_png(os.path.join(image_dir, file_name), scene.image)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for cat, mask in zip(scene.categories, scene.visible_masks):
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat + 1}
            ann.update(_mask_annotation(mask))
            ann["iscrowd"] = 0
            annotations.append(ann)
    return {
        "info": {
            "description": f"nfdet synthetic shapes ({split})",
            "version": str(GENERATOR_VERSION),
            "contributor": "nfdet.data.synthetic",
            "params": params.to_dict(),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(CATEGORIES)
        ],
    }


def _planned_files(params: SyntheticDataParams) -> list[str]:
    """Relative paths of every file a dataset with these parameters consists of."""
    files = []
    for split, num in (("train", params.num_train), ("val", params.num_val)):
        files.append(f"coco/{split}.json")
        files += [f"coco/{split}/{i + 1:06d}.png" for i in range(num)]
    for split, num in (("train", params.cls_train_per_class), ("val", params.cls_val_per_class)):
        for name in CATEGORIES:
            files += [f"classification/{split}/{name}/{name}_{i:05d}.png" for i in range(num)]
    return files


def synthetic_data_paths(root: str) -> dict[str, str]:
    """Where the datasets lie under ``root``.

    Returns keys ``coco_train_json``, ``coco_train_images``, ``coco_val_json``,
    ``coco_val_images``, ``classification_train``, ``classification_val``, ``manifest``.
    """
    return {
        "coco_train_json": os.path.join(root, "coco", "train.json"),
        "coco_train_images": os.path.join(root, "coco", "train"),
        "coco_val_json": os.path.join(root, "coco", "val.json"),
        "coco_val_images": os.path.join(root, "coco", "val"),
        "classification_train": os.path.join(root, "classification", "train"),
        "classification_val": os.path.join(root, "classification", "val"),
        "manifest": os.path.join(root, MANIFEST_NAME),
    }


@dataclass
class SyntheticData:
    """What :func:`make_synthetic_data` produced or found.

    Args:
        root (str): the output directory.
        params (SyntheticDataParams): the parameters of the dataset there.
        generated (bool): False when a complete dataset with equal parameters was already there.
        paths (dict[str, str]): see :func:`synthetic_data_paths`.
        stats (dict): counts (images, annotations per category) and ``seconds``.
    """

    root: str
    params: SyntheticDataParams
    generated: bool
    paths: dict[str, str]
    stats: dict[str, Any]


def _read_manifest(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable manifest {path}: {e}") from e
    for key in ("version", "status", "params", "files", "stats"):
        if key not in manifest:
            raise ValueError(f"manifest {path} lacks key {key!r}")
    return manifest


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)


def _remove_listed(root: str, files: list[str]) -> None:
    """Delete the files a manifest lists (ours), then the directories they leave empty."""
    dirs = set()
    for rel in files:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            os.remove(path)
        parent = os.path.dirname(rel)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for rel in sorted(dirs, key=lambda d: d.count("/"), reverse=True):
        path = os.path.join(root, rel)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)


def make_synthetic_data(
    root: str, params: SyntheticDataParams | None = None, force: bool = False
) -> SyntheticData:
    """Write the classification folder and the COCO splits under ``root``, or reuse them.

    A manifest (``root/nfdet_synthetic_manifest.json``) records the parameters and the files.
    With a complete dataset of equal parameters already there, nothing is written. With different
    parameters it raises ``FileExistsError`` unless ``force``, which deletes only the files the
    old manifest lists before generating. Files that no manifest lists are never deleted: if
    ``root/coco`` or ``root/classification`` hold files but there is no manifest, it refuses.

    Args:
        root (str): output directory (created if missing).
        params (SyntheticDataParams): dataset parameters; defaults are the demo's.
        force (bool): replace a dataset made with other parameters.
    """
    params = params or SyntheticDataParams()
    paths = synthetic_data_paths(root)
    manifest_path = paths["manifest"]
    wanted = {"version": GENERATOR_VERSION, "params": params.to_dict()}
    if os.path.exists(manifest_path):
        old = _read_manifest(manifest_path)
        same = {"version": old["version"], "params": old["params"]} == wanted
        if same and old["status"] == "complete":
            missing = [f for f in old["files"] if not os.path.isfile(os.path.join(root, f))]
            if not missing:
                return SyntheticData(root, params, False, paths, old["stats"])
            if not force:
                raise FileExistsError(
                    f"{root}: the dataset is incomplete ({len(missing)} files missing, e.g. "
                    f"{missing[0]}); run again with force=True (--force) to regenerate it"
                )
        elif not same and old["status"] == "complete" and not force:
            diff = {
                k: (old["params"].get(k), v)
                for k, v in wanted["params"].items()
                if old["params"].get(k) != v
            }
            if old["version"] != GENERATOR_VERSION:
                diff["generator version"] = (old["version"], GENERATOR_VERSION)
            raise FileExistsError(
                f"{root} holds a synthetic dataset made with other parameters "
                f"(name: (existing, requested)) {diff}; use another directory, or force=True "
                "(--force) to replace it (only the files its manifest lists are deleted)"
            )
        # Ours to replace: an interrupted run, or a forced one.
        _remove_listed(root, old["files"])
        os.remove(manifest_path)
    else:
        for sub in ("coco", "classification"):
            path = os.path.join(root, sub)
            if os.path.isdir(path) and os.listdir(path):
                raise FileExistsError(
                    f"{path} exists and is not empty, but {manifest_path} is missing, so these "
                    "files were not written by this generator; choose another directory or "
                    "remove it yourself"
                )

    start = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    files = _planned_files(params)
    # Written first, so that an interrupted run is recognised as ours and cleaned up next time.
    _write_json(manifest_path, {**wanted, "status": "incomplete", "files": files, "stats": {}})

    stats: dict[str, Any] = {}
    for split, num in (("train", params.num_train), ("val", params.num_val)):
        coco = _coco_split(root, split, num, params)
        _write_json(paths[f"coco_{split}_json"], coco)
        per_cat = {name: 0 for name in CATEGORIES}
        for ann in coco["annotations"]:
            per_cat[CATEGORIES[ann["category_id"] - 1]] += 1
        stats[f"coco_{split}"] = {"images": num, "annotations": per_cat}

    for split, num in (("train", params.cls_train_per_class), ("val", params.cls_val_per_class)):
        for cat, name in enumerate(CATEGORIES):
            class_dir = os.path.join(paths[f"classification_{split}"], name)
            os.makedirs(class_dir, exist_ok=True)
            for index in range(num):
                rng = np.random.default_rng([params.seed, _STREAM_CLS[split], cat, index])
                image = render_classification_image(rng, cat, params.cls_image_size, params)
                _write_png(os.path.join(class_dir, f"{name}_{index:05d}.png"), image)
        stats[f"classification_{split}"] = {"images_per_class": num, "classes": list(CATEGORIES)}

    stats["seconds"] = round(time.perf_counter() - start, 3)
    _write_json(manifest_path, {**wanted, "status": "complete", "files": files, "stats": stats})
    return SyntheticData(root, params, True, paths, stats)
