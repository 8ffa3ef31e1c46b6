"""Up-front checks of dataset files and a tolerant image reader, shared by both trainers.

Nothing here imports detectron2. The policy for each kind of bad input is in
``docs/reliability.md``; in short:

- A dataset file that is missing, is not valid JSON, or has the wrong structure (a missing key,
  a value of the wrong type, duplicate ids, an annotation of an unknown image or category) is an
  error (``DatasetError``) that names the file and the offending key, id or value.
- Annotations that cannot be trained on but are otherwise well formed (boxes of zero or negative
  size or with non-finite numbers, boxes or polygons entirely outside the image, degenerate or
  empty polygons) are dropped and counted per reason; boxes and polygons that stick out of the
  image are clipped to it. ``CocoCheckReport.summary()`` says what was dropped, with ids.
- Images are decoded to 8-bit RGB whatever their mode (grayscale, palette, RGBA/LA: alpha
  dropped, CMYK, 16-bit and 32-bit integer: scaled to 0-255, float: 0-1 scaled to 0-255).
  A file that cannot be decoded raises ``ImageReadError`` naming the file.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DatasetError",
    "ImageReadError",
    "to_rgb_uint8",
    "read_image_rgb",
    "load_json_file",
    "polygon_area",
    "CocoCheckReport",
    "check_coco_dict",
    "load_checked_coco",
]


class DatasetError(ValueError):
    """A dataset file is missing pieces or inconsistent; the message names the file and the
    key, id or value that is wrong."""


class ImageReadError(OSError):
    """An image file is missing, truncated or not an image.

    Args:
        message (str): what is wrong, naming the file.
        path (str | None): the file.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def to_rgb_uint8(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    PIL's own ``convert("RGB")`` saturates 16-bit and 32-bit integer images (every value above
    255 becomes white), so those are scaled instead: 16-bit data (the ``I;16*`` modes, and
    ``I`` images whose values fit in 16 bits) by 255/65535, wider ``I`` data by its maximum.
    Float (``F``) images are taken as 0-1 when their maximum is at most 1, else as 0-255, and
    clipped. Alpha (RGBA, LA, PA, palette transparency) is dropped, as ``convert`` does.

    Args:
        img (PIL.Image.Image): a decoded image.

    Returns:
        PIL.Image.Image: an ``RGB`` image of the same size.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        array = np.asarray(img)
        if array.ndim == 3:  # multi-channel high bit depth (rare in PIL): keep the first three
            array = array[..., :3]
        if img.mode == "F":
            array = array.astype(np.float64)
            array = np.nan_to_num(array, nan=0.0, posinf=255.0, neginf=0.0)
            scale = 255.0 if array.size and array.max() <= 1.0 else 1.0
            array = np.clip(array * scale, 0, 255)
        else:
            array = np.clip(array.astype(np.float64), 0, None)
            peak = array.max() if array.size else 0.0
            array = array * (255.0 / (65535.0 if peak <= 65535 else peak))
        array = np.rint(array).astype(np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return img.convert("RGB")


def read_image_rgb(path: str, exif_transpose: bool = False) -> Image.Image:
    """Read an image file as 8-bit RGB (see ``to_rgb_uint8``), decoding it fully.

    Args:
        path (str): the image file.
        exif_transpose (bool): apply the EXIF orientation (as detectron2's reader does).

    Raises:
        ImageReadError: the file is missing, truncated, or not an image PIL can decode; the
            message names the file and the reason.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncation shows here, not later in a transform
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return to_rgb_uint8(img)
    except FileNotFoundError:
        raise ImageReadError(f"Image {path!r} does not exist", path) from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"Image {path!r} is not an image file PIL can read", path) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        # OSError: "image file is truncated", broken data streams; the others: corrupt headers.
        raise ImageReadError(f"Image {path!r} cannot be decoded ({e})", path) from None


def load_json_file(path: str) -> Any:
    """Read a JSON file, turning every failure into an error that names the file.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: the file is not UTF-8 or not valid JSON (line and column named).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Dataset file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})"
                           ) from None


@dataclass
class CocoCheckReport:
    """What ``check_coco_dict`` dropped or changed.

    Args:
        json_file (str): the checked file.
        num_images (int): images in the file.
        num_annotations (int): annotations in the file.
        dropped (Counter): dropped annotations per reason.
        dropped_polygons (Counter): polygons removed from kept annotations, per reason.
        clipped (int): annotations whose box or polygons were clipped to the image.
        examples (dict[str, list]): the first annotation ids per reason.
        empty_images (int): images left without annotations (kept; detectron2's
            ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` decides about them in training).
    """

    json_file: str
    num_images: int = 0
    num_annotations: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_polygons: Counter = field(default_factory=Counter)
    clipped: int = 0
    examples: dict[str, list] = field(default_factory=dict)
    empty_images: int = 0

    def _note(self, counter: Counter, reason: str, ann_id: Any) -> None:
        counter[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < 5:
            ids.append(ann_id)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        """One paragraph: counts per reason with example annotation ids."""
        parts = [
            f"{self.json_file}: {self.num_images} images, {self.num_annotations} annotations"
        ]

        def reasons(counter: Counter) -> str:
            return "; ".join(
                f"{n} {reason} (annotation ids {', '.join(map(str, self.examples[reason]))}"
                f"{', ...' if n > len(self.examples[reason]) else ''})"
                for reason, n in counter.most_common()
            )

        if self.dropped:
            parts.append(f"dropped {self.num_dropped} annotations: {reasons(self.dropped)}")
        if self.dropped_polygons:
            parts.append(
                f"removed {sum(self.dropped_polygons.values())} polygons from kept "
                f"annotations: {reasons(self.dropped_polygons)}"
            )
        if self.clipped:
            parts.append(f"clipped {self.clipped} annotations to the image")
        if self.empty_images:
            parts.append(f"{self.empty_images} images have no annotations")
        return "; ".join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: float | int) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise DatasetError(f"{where}: {message}")


def _list_field(data: dict, key: str, json_file: str, required: bool = True) -> list:
    if key not in data:
        _require(not required, json_file, f"no {key!r} list (COCO format needs it)")
        return []
    value = data[key]
    _require(isinstance(value, list), json_file,
             f"{key!r} must be a list, got {type(value).__name__}")
    return value


def polygon_area(xy: list[float]) -> float:
    """The area of a polygon given as ``[x0, y0, x1, y1, ...]`` (shoelace formula).

    Args:
        xy (list[float]): the vertices' coordinates, in order.
    """
    xs, ys = np.asarray(xy[0::2]), np.asarray(xy[1::2])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2.0)


def _check_images(images: list, json_file: str, image_root: str | None,
                  check_files: bool) -> dict[Any, dict]:
    by_id: dict[Any, dict] = {}
    missing = []
    for index, img in enumerate(images):
        where = f"{json_file}: images[{index}]"
        _require(isinstance(img, dict), where, f"must be an object, got {type(img).__name__}")
        for key in ("id", "file_name", "width", "height"):
            _require(key in img, where, f"has no {key!r}")
        image_id = img["id"]
        where = f"{json_file}: image id {image_id!r}"
        _require(_is_int(image_id), where,
                 "'id' must be an integer")
        _require(image_id not in by_id, where, "appears twice in 'images'")
        _require(isinstance(img["file_name"], str) and img["file_name"] != "", where,
                 f"'file_name' must be a non-empty string, got {img['file_name']!r}")
        where = f"{json_file}: image {img['file_name']!r} (id {image_id})"
        for key in ("width", "height"):
            value = img[key]
            _require(_is_int(value) and value > 0,
                     where, f"{key!r} must be a positive integer, got {value!r}")
        if check_files and image_root is not None:
            if not os.path.isfile(os.path.join(image_root, img["file_name"])):
                missing.append(img["file_name"])
        by_id[image_id] = img
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10])
        raise DatasetError(
            f"{json_file}: {len(missing)} of {len(images)} image files are missing under "
            f"{image_root!r}: {shown}{', ...' if len(missing) > 10 else ''}"
        )
    return by_id


def _check_categories(categories: list, json_file: str) -> dict[Any, dict]:
    by_id: dict[Any, dict] = {}
    for index, cat in enumerate(categories):
        where = f"{json_file}: categories[{index}]"
        _require(isinstance(cat, dict), where, f"must be an object, got {type(cat).__name__}")
        _require("id" in cat and "name" in cat, where, "needs 'id' and 'name'")
        _require(_is_int(cat["id"]), where,
                 f"'id' must be an integer, got {cat['id']!r}")
        _require(cat["id"] not in by_id, where, f"category id {cat['id']} appears twice")
        _require(isinstance(cat["name"], str), where, f"'name' must be a string, got "
                 f"{cat['name']!r}")
        by_id[cat["id"]] = cat
    _require(bool(by_id), json_file, "'categories' is empty")
    return by_id


def _clip_polygons(segm: list, where: str, width: int, height: int
                   ) -> tuple[list, bool, list[str]]:
    """Valid polygons of ``segm`` clipped to the image: (polygons, whether any was clipped,
    reasons for the removed ones)."""
    kept, clipped, removed = [], False, []
    for poly in segm:
        _require(isinstance(poly, list) and all(_is_number(v) for v in poly), where,
                 "a polygon in 'segmentation' must be a list of numbers")
        if len(poly) < 6 or len(poly) % 2:
            removed.append("polygons with fewer than 3 points")
            continue
        if not all(map(_finite, poly)):
            removed.append("polygons with non-finite coordinates")
            continue
        xy = [float(v) for v in poly]
        xy[0::2] = [min(max(x, 0.0), width) for x in xy[0::2]]
        xy[1::2] = [min(max(y, 0.0), height) for y in xy[1::2]]
        clipped = clipped or xy != [float(v) for v in poly]
        if polygon_area(xy) <= 0.0:
            removed.append("degenerate polygons (zero area inside the image)")
            continue
        kept.append(xy)
    return kept, clipped, removed


def _check_rle(segm: dict, where: str, width: int, height: int) -> str | None:
    """None when ``segm`` is a usable RLE of this image, else the reason to drop it."""
    size, counts = segm.get("size"), segm.get("counts")
    _require(isinstance(size, list) and len(size) == 2 and all(map(_is_int, size)),
             where, f"RLE 'size' must be [height, width], got {size!r}")
    _require(isinstance(counts, (str, list)), where, "RLE 'counts' must be a string or a list")
    if list(size) != [height, width]:
        return "RLE masks whose size differs from the image"
    if isinstance(counts, list):
        _require(all(_is_int(v) and v >= 0 for v in counts),
                 where, "uncompressed RLE 'counts' must be non-negative integers")
        if sum(counts) != height * width:
            return "RLE masks whose counts do not add up to height x width"
        if sum(counts[1::2]) == 0:
            return "empty masks"
        return None
    import pycocotools.mask as mask_util  # only datasets with RLE masks need pycocotools

    try:
        area = float(mask_util.area({"size": size, "counts": counts.encode("ascii")}))
    except Exception:  # pycocotools raises assorted errors on a malformed string
        return "RLE masks that cannot be decoded"
    return None if area > 0 else "empty masks"


def check_coco_dict(data: Any, json_file: str, image_root: str | None = None,
                    check_files: bool = True) -> tuple[dict, CocoCheckReport]:
    """Check a parsed COCO instances file and return a cleaned copy.

    Errors (``DatasetError``, naming the file and the image/annotation/category id or field):
    a top level that is not an object; ``images`` or ``categories`` missing or not lists; an
    image or annotation without an integer ``id``; an image without a ``file_name`` or a
    positive integer ``width`` / ``height``; duplicate image, category or annotation ids; an
    annotation that is not an object, lacks ``image_id`` / ``category_id`` / ``bbox``, has a
    ``bbox`` that is not four numbers, refers to an image or category id not in the file, or
    has a malformed segmentation; image files missing under ``image_root`` (listed).

    Dropped (counted in the report): annotations whose box has a non-finite number, zero or
    negative width or height, or lies entirely outside the image; annotations left without a
    valid polygon or with an unusable RLE mask; in a file where some annotations have masks,
    annotations without one (detectron2 expects masks on all or none of an image's
    annotations). Polygons with fewer than 3 points, non-finite coordinates, or zero area
    inside the image are removed from their annotation. Boxes and polygon coordinates outside
    the image are clipped to it.

    Args:
        data: the parsed JSON.
        json_file (str): its path, for messages.
        image_root (str | None): folder of the images; None skips the file check.
        check_files (bool): check that every image file exists (a ``stat`` each; no decoding).

    Returns:
        tuple: (cleaned dict with ``images``, ``annotations``, ``categories``, report).
    """
    _require(isinstance(data, dict), json_file,
             f"the top level must be a JSON object with 'images', 'annotations' and "
             f"'categories', got {type(data).__name__}")
    images = _check_images(_list_field(data, "images", json_file), json_file, image_root,
                           check_files)
    categories = _check_categories(_list_field(data, "categories", json_file), json_file)
    annotations = _list_field(data, "annotations", json_file, required=False)
    report = CocoCheckReport(json_file, num_images=len(images),
                             num_annotations=len(annotations))
    any_mask = any(isinstance(a, dict) and a.get("segmentation") for a in annotations)
    seen_ids: set = set()
    kept = []
    for index, ann in enumerate(annotations):
        where, image = _check_annotation(ann, index, json_file, images, categories, seen_ids)
        clean = _clean_annotation(ann, where, image, any_mask, report)
        if clean is not None:
            kept.append(clean)
    with_annotations = {a["image_id"] for a in kept}
    report.empty_images = sum(1 for i in images if i not in with_annotations)
    cleaned = {
        "images": list(images.values()),
        "annotations": kept,
        "categories": list(categories.values()),
    }
    return cleaned, report


def _check_annotation(ann: Any, index: int, json_file: str, images: dict[Any, dict],
                      categories: dict[Any, dict], seen_ids: set) -> tuple[str, dict]:
    """The structural checks of ``annotations[index]`` (``DatasetError`` on failure); records
    its id in ``seen_ids``.

    Returns:
        (where, image): how messages name the annotation, and its image.
    """
    where = f"{json_file}: annotations[{index}]"
    _require(isinstance(ann, dict), where, f"must be an object, got {type(ann).__name__}")
    _require(_is_int(ann.get("id")), where,
             f"needs an integer 'id', got {ann.get('id')!r}")
    ann_id = ann["id"]
    where = f"{json_file}: annotation id {ann_id}"
    _require(ann_id not in seen_ids, where, "appears twice in 'annotations'")
    seen_ids.add(ann_id)
    for key in ("image_id", "category_id", "bbox"):
        _require(key in ann, where, f"has no {key!r}")
    image = images.get(ann["image_id"]) if _is_int(ann["image_id"]) else None
    _require(image is not None, where,
             f"image_id {ann['image_id']!r} is not an id in 'images'")
    where += f" (image {image['file_name']!r})"
    category = ann["category_id"]
    _require(_is_int(category) and category in categories, where,
             f"category_id {category!r} is not an id in 'categories' "
             f"(ids: {', '.join(map(str, sorted(categories)))})")
    bbox = ann["bbox"]
    _require(isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox)),
             where, f"'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
    iscrowd = ann.get("iscrowd", 0)
    _require(iscrowd in (0, 1) and not isinstance(iscrowd, float), where,
             f"'iscrowd' must be 0 or 1, got {iscrowd!r}")
    return where, image


def _clean_annotation(ann: dict, where: str, image: dict, any_mask: bool,
                      report: CocoCheckReport) -> dict | None:
    """A structurally valid annotation with its box and polygons clipped to the image, or None
    when it cannot be trained on (the reason noted in ``report.dropped``)."""
    width, height = image["width"], image["height"]
    box, box_clipped, reason = _clip_box(ann["bbox"], width, height)
    if reason is not None:
        report._note(report.dropped, reason, ann["id"])
        return None
    clean = dict(ann)
    clean["bbox"] = box
    clean["iscrowd"] = ann.get("iscrowd", 0)
    reason, mask_clipped = _clean_mask(clean, where, width, height, any_mask, report)
    if reason is not None:
        report._note(report.dropped, reason, ann["id"])
        return None
    report.clipped += box_clipped or mask_clipped
    return clean


def _clip_box(bbox: list, width: int, height: int
              ) -> tuple[list[float] | None, bool, str | None]:
    """An xywh box clipped to the image: (box, whether it was clipped, None), or (None, False,
    the reason to drop it)."""
    if not all(map(_finite, bbox)):
        return None, False, "boxes with non-finite numbers"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, False, ("boxes with negative size" if w < 0 or h < 0 else
                             "boxes of zero area")
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None, False, "boxes outside the image"
    return [x0, y0, x1 - x0, y1 - y0], (x0, y0, x1, y1) != (x, y, x + w, y + h), None


def _clean_mask(clean: dict, where: str, width: int, height: int, any_mask: bool,
                report: CocoCheckReport) -> tuple[str | None, bool]:
    """Check ``clean["segmentation"]`` and clip its polygons to the image, in place; polygons
    removed from a kept annotation are noted in ``report.dropped_polygons``.

    Returns:
        (reason, clipped): the reason to drop the annotation (None to keep it), and whether a
        polygon was clipped.
    """
    segm = clean.get("segmentation")
    if not segm:
        if any_mask:
            return "annotations without a mask in a file with masks", False
        clean.pop("segmentation", None)
        return None, False
    if isinstance(segm, list):
        polygons, clipped, removed = _clip_polygons(segm, where, width, height)
        if not polygons:
            return f"annotations without a valid polygon ({removed[0]})", False
        for reason in removed:
            report._note(report.dropped_polygons, reason, clean["id"])
        clean["segmentation"] = polygons
        return None, clipped
    _require(isinstance(segm, dict), where,
             "'segmentation' must be a list of polygons or an RLE object")
    return _check_rle(segm, where, width, height), False


def load_checked_coco(json_file: str, image_root: str | None = None,
                      check_files: bool = True) -> tuple[dict, CocoCheckReport]:
    """``load_json_file`` then ``check_coco_dict``.

    Raises:
        FileNotFoundError: the file is missing.
        DatasetError: invalid JSON or a structural error (see ``check_coco_dict``).
    """
    return check_coco_dict(load_json_file(json_file), json_file, image_root, check_files)
