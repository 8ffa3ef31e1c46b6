"""Tests of the synthetic shapes generator (nfdet.data) and tools/make_demo_data.py."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from helpers import run_tool
from pycocotools.coco import COCO

from nfdet.data import (
    CATEGORIES,
    MANIFEST_NAME,
    SyntheticDataParams,
    make_synthetic_data,
    render_scene,
)

# Small but varied: variable image sizes, full object size range, every split non-empty.
SMALL = SyntheticDataParams(
    seed=7,
    num_train=24,
    num_val=12,
    image_size=(192, 256),
    cls_train_per_class=3,
    cls_val_per_class=2,
    cls_image_size=48,
)
TINY = SyntheticDataParams(
    seed=1, num_train=3, num_val=2, cls_train_per_class=1, cls_val_per_class=1
)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_synthetic_data(str(tmp_path_factory.mktemp("synthetic")), SMALL)


def _listed_files(root: str) -> list[str]:
    with open(os.path.join(root, MANIFEST_NAME)) as f:
        return json.load(f)["files"]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / name) for name in "abc")
    make_synthetic_data(a, TINY)
    make_synthetic_data(b, TINY)
    make_synthetic_data(c, SyntheticDataParams(**{**TINY.to_dict(), "seed": 2}))
    files = _listed_files(a)
    assert files == _listed_files(b)
    # Every file the dataset consists of exists, and is byte-identical across the two runs.
    for rel in files:
        assert _read(os.path.join(a, rel)) == _read(os.path.join(b, rel)), rel
    for rel in ("coco/train.json", "coco/val.json", "coco/train/000001.png"):
        assert _read(os.path.join(a, rel)) != _read(os.path.join(c, rel)), rel
    assert _read(os.path.join(a, "classification/train/star/star_00000.png")) != _read(
        os.path.join(c, "classification/train/star/star_00000.png")
    )
    # The held-out split draws from its own stream.
    assert _read(os.path.join(a, "coco/train/000001.png")) != _read(
        os.path.join(a, "coco/val/000001.png")
    )


def test_coco_json_accepted_by_pycocotools_and_detectron2(small_data):
    from detectron2.data import detection_utils
    from detectron2.data.datasets import load_coco_json
    from detectron2.structures import BoxMode

    for split, num in (("train", SMALL.num_train), ("val", SMALL.num_val)):
        json_file = small_data.paths[f"coco_{split}_json"]
        image_root = small_data.paths[f"coco_{split}_images"]
        coco = COCO(json_file)
        assert len(coco.getImgIds()) == num
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
        assert sorted(coco.getCatIds()) == list(range(1, len(CATEGORIES) + 1))
        for key in ("info", "licenses"):
            assert key in coco.dataset

        dicts = load_coco_json(json_file, image_root, dataset_name=f"nfdet_test_synth_{split}")
        assert len(dicts) == num
        for d in dicts:
            image = cv2.imread(d["file_name"])
            assert image is not None, d["file_name"]
            assert image.shape[:2] == (d["height"], d["width"])
            assert SMALL.image_size[0] <= d["height"] <= SMALL.image_size[1]
            for ann in d["annotations"]:
                assert ann["bbox_mode"] == BoxMode.XYWH_ABS
                assert ann["iscrowd"] == 0
                assert 0 <= ann["category_id"] < len(CATEGORIES)
            # What detectron2's mapper builds for training with INPUT.MASK_FORMAT = "bitmask".
            instances = detection_utils.annotations_to_instances(
                d["annotations"], (d["height"], d["width"]), mask_format="bitmask"
            )
            assert instances.gt_masks.tensor.shape == (
                len(d["annotations"]),
                d["height"],
                d["width"],
            )


def test_annotations_match_masks_exactly(small_data):
    total = 0
    for split in ("train", "val"):
        coco = COCO(small_data.paths[f"coco_{split}_json"])
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert 1 <= len(anns) <= 6
            union = np.zeros((info["height"], info["width"]), dtype=np.int32)
            for ann in anns:
                mask = coco.annToMask(ann)
                assert mask.shape == union.shape
                ys, xs = np.nonzero(mask)
                assert ann["area"] == len(xs) > 0
                assert ann["area"] == int(mask_util.area(ann["segmentation"]))
                x0, y0 = int(xs.min()), int(ys.min())
                assert ann["bbox"] == [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
                assert ann["bbox"][2] <= SMALL.object_size[1] + 1
                assert ann["bbox"][3] <= SMALL.object_size[1] + 1
                union += mask
                total += 1
            # Visible masks of one image never share a pixel.
            assert union.max() == 1
    assert total > SMALL.num_train + SMALL.num_val


def test_scenes_occlusion_sizes_and_counts():
    params = SyntheticDataParams(seed=3)
    sizes, occluded, counts = [], 0, []
    for index in range(40):
        scene = render_scene(np.random.default_rng([params.seed, 9, index]), params, 256, 256)
        counts.append(len(scene.categories))
        n = len(scene.categories)
        assert n == len(scene.full_masks) == len(scene.visible_masks)
        for i, (full, visible) in enumerate(zip(scene.full_masks, scene.visible_masks)):
            # Visible = own mask minus every later (occluding) mask, and enough of it is left.
            above = np.zeros_like(full)
            for later in scene.full_masks[i + 1 :]:
                above |= later
            assert np.array_equal(visible, full & ~above)
            assert visible.sum() >= params.min_visible * full.sum()
            occluded += int(visible.sum() < full.sum())
            ys, xs = np.nonzero(full)
            sizes.append(max(np.ptp(xs), np.ptp(ys)) + 1)
    sizes = np.array(sizes)
    assert min(counts) >= 1 and max(counts) <= 6 and max(counts) >= 4
    assert occluded >= 10
    assert sizes.min() >= params.object_size[0] - 1
    assert sizes.max() <= params.object_size[1] + 1
    # Sizes spread over the range rather than piling up at the small end.
    assert sizes.min() < 24 and sizes.max() > 110
    assert np.mean(sizes < 32) < 0.35


def test_categories_and_classification_folder(small_data):
    for split in ("train", "val"):
        coco = COCO(small_data.paths[f"coco_{split}_json"])
        present = {ann["category_id"] for ann in coco.dataset["annotations"]}
        assert present == set(range(1, len(CATEGORIES) + 1)), split

        root = small_data.paths[f"classification_{split}"]
        per_class = SMALL.cls_train_per_class if split == "train" else SMALL.cls_val_per_class
        assert sorted(os.listdir(root)) == sorted(CATEGORIES)
        for name in CATEGORIES:
            files = sorted(os.listdir(os.path.join(root, name)))
            assert len(files) == per_class
            image = cv2.imread(os.path.join(root, name, files[0]))
            assert image.shape == (SMALL.cls_image_size, SMALL.cls_image_size, 3)


def test_manifest_reuse_refuse_force(tmp_path):
    root = str(tmp_path / "data")
    first = make_synthetic_data(root, TINY)
    assert first.generated
    probe = os.path.join(root, "coco", "train", "000001.png")
    os.utime(probe, (1, 1))
    again = make_synthetic_data(root, TINY)
    assert not again.generated
    assert os.stat(probe).st_mtime == 1  # nothing rewritten

    user_files = [os.path.join(root, "notes.txt"), os.path.join(root, "coco", "mine.txt")]
    for path in user_files:
        with open(path, "w") as f:
            f.write("user data")
    smaller = SyntheticDataParams(**{**TINY.to_dict(), "num_train": 2})
    with pytest.raises(FileExistsError, match="num_train"):
        make_synthetic_data(root, smaller)
    forced = make_synthetic_data(root, smaller, force=True)
    assert forced.generated
    assert not os.path.exists(os.path.join(root, "coco", "train", "000003.png"))
    assert os.path.exists(os.path.join(root, "coco", "train", "000002.png"))
    for path in user_files:
        assert _read(path) == b"user data"

    # An interrupted run (manifest left "incomplete") is ours to redo.
    with open(os.path.join(root, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    manifest["status"] = "incomplete"
    with open(os.path.join(root, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    os.remove(os.path.join(root, "coco", "val.json"))
    assert make_synthetic_data(root, smaller).generated
    assert os.path.exists(os.path.join(root, "coco", "val.json"))

    # Without a manifest, foreign files in our folders make it refuse.
    foreign = str(tmp_path / "foreign")
    os.makedirs(os.path.join(foreign, "coco"))
    with open(os.path.join(foreign, "coco", "train.json"), "w") as f:
        f.write("{}")
    with pytest.raises(FileExistsError, match="not written by this generator"):
        make_synthetic_data(foreign, TINY, force=True)
    assert _read(os.path.join(foreign, "coco", "train.json")) == b"{}"


@pytest.mark.parametrize(
    "field, value",
    [("object_size", (12, 300)), ("objects_per_image", (0, 3)), ("min_visible", 0.0)],
)
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticDataParams(**{field: value})


def test_cli_generates_reuses_and_refuses(tmp_path):
    out = str(tmp_path / "cli")
    small = ["--num-train", "2", "--num-val", "1", "--image-size", "128", "160"]
    small += ["--object-size", "12", "64", "--cls-train-per-class", "1", "--cls-val-per-class", "1"]

    def run(*extra):
        return run_tool("make_demo_data.py", out, *small, *extra)

    first = run()
    assert first.returncode == 0, first.stderr
    assert "Generated" in first.stdout and "coco/train.json" in first.stdout
    second = run()
    assert second.returncode == 0 and "nothing regenerated" in second.stdout
    clash = run("--seed", "5")
    assert clash.returncode == 2 and "seed" in clash.stderr
    forced = run("--seed", "5", "--force")
    assert forced.returncode == 0 and "Generated" in forced.stdout
