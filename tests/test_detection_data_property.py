"""Issue 9, property: a randomly corrupted COCO file fed through the real loading path
(``--register-coco``'s loader, detectron2's catalog, ``load_train_dataset``, NFNetTrainer's
train loader and mapper, one forward pass of Mask R-CNN in training mode) ends in a clean,
named error or in a dataset whose every record is valid for training; never in a crash inside
the training loop."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from helpers import checked_quick_cfg, write_tiny_coco
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from nfdet.data.validate import DatasetError, ImageReadError
from nfdet.detection.data import NFNetDatasetMapper, load_train_dataset, register_checked_coco
from nfdet.detection.trainer import build_resumable_train_loader

NAMES = itertools.count()
TRUNCATED = "truncated.png"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[dict, Path, Path]:
    """A valid 3-image COCO dict, its image folder (plus a truncated PNG), and a scratch dir."""
    root = tmp_path_factory.mktemp("property")
    json_path, image_dir = write_tiny_coco(root / "coco", num_images=3, seed=3)
    good = (image_dir / "0001.png").read_bytes()
    (image_dir / TRUNCATED).write_bytes(good[: len(good) // 3])
    return json.loads(json_path.read_text()), image_dir, root


@functools.lru_cache(maxsize=1)
def _model():
    """Mask R-CNN nano in training mode (not a fixture: hypothesis would print it on failure)."""
    torch.manual_seed(0)
    return build_model(_cfg("polygon")).train()


def _cfg(mask_format: str):
    return checked_quick_cfg("MODEL.ROI_HEADS.NUM_CLASSES", "4", "INPUT.MASK_FORMAT", mask_format,
                             "SOLVER.IMS_PER_BATCH", "2")


# Values that do not belong anywhere: wrong types, non-finite and huge numbers.
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.text(max_size=3),
    st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-5, 5), max_size=5),
    st.dictionaries(st.sampled_from(["size", "counts"]), st.integers(0, 3), max_size=2),
)
coord = st.one_of(st.floats(-60, 200), st.sampled_from([0, -1, 1e9, float("nan"),
                                                        float("inf")]))
box = st.lists(coord, min_size=4, max_size=4)
polygon = st.lists(coord, min_size=0, max_size=12)
rle = st.fixed_dictionaries({
    "size": st.lists(st.integers(0, 130), min_size=2, max_size=2),
    "counts": st.one_of(st.lists(st.integers(0, 9000), max_size=6), st.text(max_size=8)),
})
ANN_FIELDS = ["id", "image_id", "category_id", "bbox", "segmentation", "iscrowd", "area"]
IMG_FIELDS = ["id", "file_name", "width", "height"]

# Mutations a loader must survive by dropping, clipping or skipping ...
soft = st.one_of(
    st.tuples(st.just("bbox"), st.integers(0, 20), box),
    st.tuples(st.just("polygons"), st.integers(0, 20), st.lists(polygon, max_size=3)),
    st.tuples(st.just("rle"), st.integers(0, 20), rle),
    st.tuples(st.just("drop_anns"), st.integers(0, 5)),
    st.tuples(st.just("img_file"), st.integers(0, 5), st.just(TRUNCATED)),
)
# ... and ones that make the file unusable, to be reported by name.
hard = st.one_of(
    st.tuples(st.just("ann_field"), st.integers(0, 20), st.sampled_from(ANN_FIELDS), junk),
    st.tuples(st.just("ann_del"), st.integers(0, 20), st.sampled_from(ANN_FIELDS)),
    st.tuples(st.just("category"), st.integers(0, 3)),
    st.tuples(st.just("img_field"), st.integers(0, 5), st.sampled_from(IMG_FIELDS), junk),
    st.tuples(st.just("img_del"), st.integers(0, 5), st.sampled_from(IMG_FIELDS)),
    st.tuples(st.just("img_file"), st.integers(0, 5), st.just("gone.png")),
    st.tuples(st.just("top"), st.sampled_from(["images", "annotations", "categories"]), junk),
    st.tuples(st.just("dup_ann"), st.integers(0, 20)),
)
# sampled_from is close to uniform (integers() favours its bounds).
mutation = st.sampled_from(range(4)).flatmap(lambda k: hard if k == 3 else soft)  # 1:3


def _apply(data: dict, m: tuple) -> None:
    kind, anns, imgs = m[0], data.get("annotations"), data.get("images")

    def pick(items, i):
        return items[i % len(items)] if isinstance(items, list) and items else None

    ann = pick(anns, m[1]) if kind in ("ann_field", "ann_del", "bbox", "polygons", "rle",
                                       "dup_ann") else pick(anns, 0) if kind == "category" else None
    img = pick(imgs, m[1]) if kind.startswith("img_") else None
    if kind == "ann_field" and isinstance(ann, dict):
        ann[m[2]] = m[3]
    elif kind == "ann_del" and isinstance(ann, dict):
        ann.pop(m[2], None)
    elif kind == "bbox" and isinstance(ann, dict):
        ann["bbox"] = m[2]
    elif kind == "polygons" and isinstance(ann, dict):
        ann["segmentation"] = m[2]
    elif kind == "rle" and isinstance(ann, dict):
        ann["segmentation"] = m[2]
    elif kind == "category" and isinstance(ann, dict):
        ann["category_id"] = m[1]
    elif kind == "img_field" and isinstance(img, dict):
        img[m[2]] = m[3]
    elif kind == "img_del" and isinstance(img, dict):
        img.pop(m[2], None)
    elif kind == "img_file" and isinstance(img, dict):
        img["file_name"] = m[2]
    elif kind == "top":
        data[m[1]] = m[2]
    elif kind == "dup_ann" and isinstance(ann, dict):
        anns.append(copy.deepcopy(ann))
    elif kind == "drop_anns" and isinstance(anns, list) and isinstance(pick(imgs, m[1]), dict):
        image_id = pick(imgs, m[1]).get("id")
        data["annotations"] = [a for a in anns if not isinstance(a, dict)
                               or a.get("image_id") != image_id]


def _text(data: dict, cut: float | None) -> str:
    text = json.dumps(data)
    return text if cut is None else text[: int(len(text) * cut)]


def _assert_valid(records: list[dict], name: str) -> None:
    classes = MetadataCatalog.get(name).thing_classes
    for r in records:
        assert Path(r["file_name"]).is_file()
        w, h = r["width"], r["height"]
        assert isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
        with_masks = {"segmentation" in a for a in r["annotations"]}
        assert len(with_masks) <= 1  # all or none: detectron2 reads annotations[0] only
        for a in r["annotations"]:
            x, y, bw, bh = a["bbox"]
            assert all(math.isfinite(v) for v in (x, y, bw, bh))
            assert bw > 0 and bh > 0 and x >= 0 and y >= 0
            assert x + bw <= w + 1e-6 and y + bh <= h + 1e-6
            assert 0 <= a["category_id"] < len(classes) and a["iscrowd"] in (0, 1)
            segm = a.get("segmentation")
            if isinstance(segm, list):
                assert segm
                for poly in segm:
                    assert len(poly) >= 6 and len(poly) % 2 == 0
                    assert all(math.isfinite(v) for v in poly)
                    assert all(0 <= v <= w for v in poly[0::2])
                    assert all(0 <= v <= h for v in poly[1::2])
            elif segm is not None:
                assert list(segm["size"]) == [h, w]


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations=st.lists(mutation, min_size=1, max_size=4),
       cut=st.sampled_from(range(8)).flatmap(lambda k: st.floats(0.0, 0.999) if k == 7
                                             else st.none()),
       mask_format=st.sampled_from(["polygon", "bitmask"]))
def test_corrupted_coco_gives_clean_error_or_valid_dataset(base, mutations, cut, mask_format):
    data, image_dir, root = base
    data = copy.deepcopy(data)
    for m in mutations:
        _apply(data, m)
    name = f"corrupt_{next(NAMES)}"
    json_path = root / f"{name}.json"
    json_path.write_text(_text(data, cut))
    register_checked_coco(name, str(json_path), str(image_dir))
    cfg = _cfg(mask_format)
    cfg.DATASETS.TRAIN = (name,)
    try:
        try:
            records = DatasetCatalog.get(name)
        except DatasetError as e:
            assert str(json_path) in str(e)  # the culprit file is named
            event("error: " + ("not valid JSON" if "not valid JSON" in str(e) else
                               "missing images" if "missing under" in str(e) else "structure"))
            return
        _assert_valid(records, name)
        try:
            dataset = load_train_dataset(cfg)
        except DatasetError as e:  # nothing to train on, masks missing or in the wrong format
            assert name in str(e)
            event("error: nothing to train on / masks")
            return
        # NFNetTrainer's training loader (it maps with NFNetDatasetMapper).
        loader = build_resumable_train_loader(cfg, dataset=dataset)
        mapper = NFNetDatasetMapper(cfg, True, dataset_size=len(dataset))
        try:
            for record in dataset:
                mapped = mapper(record)
                if mapped is None:  # skipped (named in the log): unreadable or the wrong size
                    with Image.open(record["file_name"]) as img:
                        size = img.size
                    assert (Path(record["file_name"]).name == TRUNCATED
                            or size != (record["width"], record["height"]))
                    continue
                assert torch.isfinite(mapped["instances"].gt_boxes.tensor).all()
            batch = next(iter(loader))
        except ImageReadError as e:  # no training image is readable: stop, naming one
            assert "None of the" in str(e) and any(r["file_name"] in str(e) for r in dataset)
            event("error: no readable image")
            return
        with EventStorage(0):  # detectron2's losses log into the current storage
            losses = _model()(batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        kept = sum(len(r["annotations"]) for r in records)
        event("trained" + (" (annotations dropped)" if kept < len(data["annotations"]) else ""))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
