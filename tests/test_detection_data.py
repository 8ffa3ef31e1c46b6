"""nfdet.detection.data with bad input: every bad dataset name, dataset file, annotation or image
gets an error (or a logged drop/skip) that names the culprit. Policy: docs/reliability.md. Config
errors: test_configs.py; pretraining data: test_pretrain_data.py; random corruption:
test_detection_data_property.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from helpers import tiny_coco_cfg, write_json
from PIL import Image

from nfdet.data.validate import DatasetError, ImageReadError, read_image_rgb
from nfdet.detection.cli import register_coco_datasets
from nfdet.detection.data import (
    NFNetDatasetMapper,
    check_dataset_names,
    load_checked_coco_instances,
)
from nfdet.detection.loader import build_train_loader


def _coco(tiny_coco) -> tuple[dict, Path, Path]:
    json_path, image_dir = tiny_coco
    return json.loads(json_path.read_text()), json_path, image_dir


# --- dataset names ---------------------------------------------------------------------------


def test_unregistered_or_absent_dataset_is_named(tiny_coco, tmp_path, monkeypatch,
                                                 register_coco):
    data, json_path, image_dir = _coco(tiny_coco)
    name = register_coco("tiny_named", json_path, image_dir)
    cfg = tiny_coco_cfg(name)
    cfg.defrost()
    cfg.DATASETS.TRAIN = (name[:-1] + "x",)  # a typo: the close name is suggested
    with pytest.raises(DatasetError, match=rf"DATASETS.TRAIN: dataset '{name[:-1]}x' is not "
                       rf"registered; did you mean '{name}'"):
        check_dataset_names(cfg)
    # detectron2's builtin COCO without the files: the path and $DETECTRON2_DATASETS named.
    cfg.DATASETS.TRAIN = ("coco_2017_val_100",)
    with pytest.raises(DatasetError, match=r"'coco_2017_val_100': annotation file "
                       r"'.*instances_val2017_100.json' does not exist.*DETECTRON2_DATASETS"):
        check_dataset_names(cfg)


# --- dataset json ----------------------------------------------------------------------------


def test_dataset_json_missing_names_file(tmp_path, tiny_coco):
    _, _, image_dir = _coco(tiny_coco)
    missing = tmp_path / "nowhere" / "train.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        register_coco_datasets([("absent", str(missing), str(image_dir))])
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_checked_coco_instances(str(missing), str(image_dir))


def test_dataset_json_malformed_names_file_line_and_column(tmp_path, tiny_coco, register_coco):
    _, json_path, image_dir = _coco(tiny_coco)
    broken = tmp_path / "broken.json"
    text = json.dumps(json.loads(json_path.read_text()), indent=1)
    broken.write_text(text[: len(text) // 2])  # cut mid-file
    with pytest.raises(DatasetError, match=rf"^{broken}:\d+:\d+: not valid JSON"):
        load_checked_coco_instances(str(broken), str(image_dir))
    # Through detectron2's catalog, as the trainer loads it.
    name = register_coco("broken", broken, image_dir)
    with pytest.raises(DatasetError, match=str(broken)):
        DatasetCatalog.get(name)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda d: d.pop("images"), r"no 'images' list"),
        (lambda d: d.update(annotations={"a": 1}), r"'annotations' must be a list, got dict"),
        (lambda d: d["images"][1].pop("width"), r"images\[1\]: has no 'width'"),
        (lambda d: d["images"][0].update(height=-4), r"image '0001.png' \(id 1\): 'height' must "
         r"be a positive integer, got -4"),
        (lambda d: d["annotations"][2].pop("bbox"), r"annotation id 3: has no 'bbox'"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation id 1 \(image "
         r"'0001.png'\): 'bbox' must be 4 numbers"),
        (lambda d: d["annotations"][1].update(id=1), r"annotation id 1: appears twice"),
        (lambda d: d["annotations"][0].update(image_id=77), r"annotation id 1: image_id 77 is "
         r"not an id in 'images'"),
        (lambda d: d["annotations"][0].update(segmentation=[["a", 1, 2, 3, 4, 5]]),
         r"annotation id 1 .*a polygon in 'segmentation' must be a list of numbers"),
    ],
    ids=["no_images", "annotations_not_list", "image_no_width", "image_bad_height",
         "ann_no_bbox", "ann_bbox_3", "ann_dup_id", "ann_unknown_image", "ann_bad_polygon"],
)
def test_dataset_json_wrong_structure_names_key_and_id(tiny_coco, tmp_path, corrupt, expected):
    data, _, image_dir = _coco(tiny_coco)
    corrupt(data)
    path = write_json(data, tmp_path / "bad.json")
    with pytest.raises(DatasetError, match=rf"^{path}: .*{expected}"):
        load_checked_coco_instances(str(path), str(image_dir))


def test_category_not_in_categories_names_id_annotation_and_image(tiny_coco, tmp_path):
    data, _, image_dir = _coco(tiny_coco)
    data["annotations"][3]["category_id"] = 7
    ann = data["annotations"][3]
    file_name = next(i["file_name"] for i in data["images"] if i["id"] == ann["image_id"])
    path = write_json(data, tmp_path / "cats.json")
    with pytest.raises(DatasetError, match=rf"annotation id {ann['id']} \(image '{file_name}'\): "
                       r"category_id 7 is not an id in 'categories' \(ids: 1, 2\)"):
        load_checked_coco_instances(str(path), str(image_dir))


# --- annotations: dropped or clipped, counted and named --------------------------------------


def _one(data: dict, index: int = 0) -> dict:
    """The annotation at ``index`` and its image size."""
    ann = data["annotations"][index]
    img = next(i for i in data["images"] if i["id"] == ann["image_id"])
    return ann, img["width"], img["height"]


@pytest.mark.parametrize(
    "case, reason",
    [
        ("zero_area", "boxes of zero area"),
        ("negative", "boxes with negative size"),
        ("nan", "boxes with non-finite numbers"),
        ("outside", "boxes outside the image"),
        ("empty_polygons", "annotations without a mask in a file with masks"),
        ("short_polygon", "annotations without a valid polygon (polygons with fewer than 3 "
         "points)"),
        ("collinear_polygon", "annotations without a valid polygon (degenerate polygons"),
        ("polygon_outside", "annotations without a valid polygon (degenerate polygons"),
    ],
)
def test_untrainable_annotation_is_dropped_and_named(tiny_coco, tmp_path, nfdet_log, case,
                                                     reason):
    data, _, image_dir = _coco(tiny_coco)
    ann, width, height = _one(data, 2)
    if case == "zero_area":
        ann["bbox"][2] = 0
    elif case == "negative":
        ann["bbox"][3] = -10
    elif case == "nan":
        ann["bbox"][0] = float("nan")
    elif case == "outside":
        ann["bbox"] = [width + 5, 3, 10, 10]
    elif case == "empty_polygons":
        ann["segmentation"] = []
    elif case == "short_polygon":
        ann["segmentation"] = [[1, 1, 5, 5]]
    elif case == "collinear_polygon":
        ann["segmentation"] = [[1, 1, 5, 5, 9, 9, 20, 20]]
    elif case == "polygon_outside":
        ann["segmentation"] = [[width + 1, 0, width + 9, 0, width + 9, 9]]
    path = write_json(data, tmp_path / f"{case}.json")
    records = load_checked_coco_instances(str(path), str(image_dir))
    kept = sum(len(r["annotations"]) for r in records)
    assert kept == len(data["annotations"]) - 1
    log = nfdet_log()
    assert str(path) in log and f"1 {reason}" in log and f"annotation ids {ann['id']})" in log


def test_out_of_image_coordinates_are_clipped(tiny_coco, tmp_path, nfdet_log):
    data, _, image_dir = _coco(tiny_coco)
    ann, width, height = _one(data, 0)
    ann["bbox"] = [-5.0, -3.0, width + 20.0, 10.0]
    ann["segmentation"] = [[-5, -3, width + 15, -3, width + 15, 7, -5, 7]]
    path = write_json(data, tmp_path / "clip.json")
    records = load_checked_coco_instances(str(path), str(image_dir))
    obj = next(o for r in records for o in r["annotations"] if r["image_id"] == ann["image_id"])
    assert obj["bbox"] == [0.0, 0.0, float(width), 7.0]
    assert obj["segmentation"] == [[0.0, 0.0, width, 0.0, width, 7.0, 0.0, 7.0]]
    assert "clipped 1 annotations to the image" in nfdet_log()


def test_images_without_annotations_follow_filter_empty_annotations(tiny_coco, tmp_path,
                                                                    nfdet_log, register_coco):
    data, _, image_dir = _coco(tiny_coco)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]
    name = register_coco("empty_img", write_json(data, tmp_path / "empty.json"), image_dir)
    records = DatasetCatalog.get(name)
    assert len(records) == 4 and not next(r for r in records if r["image_id"] == 2)["annotations"]
    assert "1 images have no annotations" in nfdet_log()
    # FILTER_EMPTY_ANNOTATIONS True (default): left out of training.
    assert len(build_train_loader(tiny_coco_cfg(name)).dataset) == 3  # images sampled
    # False: trained on as an image of background only.
    cfg = tiny_coco_cfg(name, DATALOADER__FILTER_EMPTY_ANNOTATIONS=False)
    mapped = NFNetDatasetMapper(cfg, True)(next(r for r in records if r["image_id"] == 2))
    assert len(mapped["instances"]) == 0 and mapped["image"].shape[0] == 3
    # Nothing left at all: a named error, not detectron2's bare assertion.
    data["annotations"] = []
    name = register_coco("no_ann", write_json(data, tmp_path / "none.json"), image_dir)
    with pytest.raises(DatasetError, match=rf"DATASETS.TRAIN \('{name}',\): nothing to train"):
        build_train_loader(tiny_coco_cfg(name))


def test_rle_masks_with_polygon_format_named_before_training(tmp_path, tiny_coco,
                                                            register_coco):
    import pycocotools.mask as mask_util

    data, _, image_dir = _coco(tiny_coco)
    ann, width, height = _one(data, 0)
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[2:9, 3:12] = 1
    rle = mask_util.encode(mask)
    ann["segmentation"] = {"size": [height, width], "counts": rle["counts"].decode()}
    name = register_coco("rle", write_json(data, tmp_path / "rle.json"), image_dir)
    with pytest.raises(DatasetError, match=r"image '.*0001.png' has RLE masks.*INPUT.MASK_FORMAT"):
        build_train_loader(tiny_coco_cfg(name))
    assert build_train_loader(tiny_coco_cfg(name, INPUT__MASK_FORMAT="bitmask")) is not None


def test_boxes_without_masks_with_mask_on_named_before_training(tmp_path, tiny_coco,
                                                               register_coco):
    data, _, image_dir = _coco(tiny_coco)
    for ann in data["annotations"]:
        del ann["segmentation"]
    name = register_coco("boxes", write_json(data, tmp_path / "boxes.json"), image_dir)
    with pytest.raises(DatasetError, match=r"image '.*0001.png' has an annotation without a "
                       r"mask, but MODEL.MASK_ON is True"):
        build_train_loader(tiny_coco_cfg(name))
    batch = next(iter(build_train_loader(tiny_coco_cfg(name, MODEL__MASK_ON=False))))
    assert all(not d["instances"].has("gt_masks") for d in batch)


# --- image files -----------------------------------------------------------------------------


def test_missing_image_files_are_listed_up_front(tiny_coco, tmp_path):
    data, _, image_dir = _coco(tiny_coco)
    data["images"][2]["file_name"] = "gone.png"
    path = write_json(data, tmp_path / "gone.json")
    with pytest.raises(DatasetError, match=rf"{path}: 1 of 4 image files are missing under "
                       rf"'{image_dir}': 'gone.png'"):
        load_checked_coco_instances(str(path), str(image_dir))


def _corrupt_images(image_dir: Path) -> tuple[Path, Path]:
    """Truncate 0001.png and overwrite 0002.png with text."""
    truncated, not_image = image_dir / "0001.png", image_dir / "0002.png"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    not_image.write_text("this is not a picture")
    return truncated, not_image


def test_truncated_and_non_images_skipped_in_training_stop_evaluation(tiny_coco, nfdet_log,
                                                                      register_coco):
    data, json_path, image_dir = _coco(tiny_coco)
    truncated, not_image = _corrupt_images(image_dir)
    name = register_coco("corrupt_img", json_path, image_dir)
    cfg = tiny_coco_cfg(name)
    records = {Path(r["file_name"]).name: r for r in DatasetCatalog.get(name)}

    train = NFNetDatasetMapper(cfg, True, dataset_size=len(records))
    assert train(records["0001.png"]) is None and train(records["0002.png"]) is None
    assert train(records["0003.png"])["image"].dtype == torch.uint8
    log = nfdet_log()
    assert f"Skipping image 1: Image '{truncated}' cannot be decoded" in log
    assert f"Skipping image 2: Image '{not_image}' is not an image file" in log
    # Through NFNetTrainer's loader: the bad ones are replaced, batches stay full.
    batch = next(iter(build_train_loader(cfg)))
    assert len(batch) == 2 and all(Path(d["file_name"]).name not in ("0001.png", "0002.png")
                                   for d in batch)

    evaluate = NFNetDatasetMapper(cfg, False)
    with pytest.raises(ImageReadError, match=rf"Image '{truncated}' cannot be decoded"):
        evaluate(records["0001.png"])
    with pytest.raises(ImageReadError, match=rf"Image '{not_image}' is not an image file"):
        evaluate(records["0002.png"])


def test_too_many_bad_images_stop_training(tiny_coco, register_coco):
    data, json_path, image_dir = _coco(tiny_coco)
    for path in image_dir.glob("*.png"):
        path.write_bytes(b"\x89PNG broken")
    name = register_coco("all_bad", json_path, image_dir)
    cfg = tiny_coco_cfg(name)
    records = DatasetCatalog.get(name)
    mapper = NFNetDatasetMapper(cfg, True, dataset_size=len(records))
    for record in records[:-1]:
        assert mapper(record) is None
    with pytest.raises(ImageReadError, match=r"None of the 4 images of the dataset could be "
                       r"read \(the last: '.*0004.png'\)"):
        mapper(records[-1])
    # More than max(10, 1%) bad images of a larger dataset: stop too.
    mapper = NFNetDatasetMapper(cfg, True, dataset_size=1000)
    bad = [dict(records[0], file_name=str(image_dir / f"{i}.png")) for i in range(11)]
    for record in bad[:-1]:
        assert mapper(record) is None
    with pytest.raises(ImageReadError, match=r"11 images could not be read \(limit 10; the "
                       r"last: '.*10.png'\)"):
        mapper(bad[-1])


def test_image_size_differs_from_annotation(tiny_coco, tmp_path, register_coco):
    data, _, image_dir = _coco(tiny_coco)
    data["images"][0]["width"] += 7
    name = register_coco("size", write_json(data, tmp_path / "size.json"), image_dir)
    record = DatasetCatalog.get(name)[0]
    with pytest.raises(ImageReadError, match=r"0001.png' is \d+x\d+ .* annotation says"):
        NFNetDatasetMapper(tiny_coco_cfg(name), False)(record)
    assert NFNetDatasetMapper(tiny_coco_cfg(name), True)(record) is None


def _mode_images(size: tuple[int, int] = (96, 80)) -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Images of other modes and the 8-bit RGB each must read as."""
    w, h = size
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    expected16 = np.rint(g16 / 257.0).astype(np.uint8)
    return {
        "gray": (Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, 2)),
        "rgba": (Image.fromarray(rgba, "RGBA"), rgba[..., :3]),
        "gray16": (Image.fromarray(g16), np.repeat(expected16[..., None], 3, 2)),
    }


def test_grayscale_rgba_16bit_read_as_rgb_uint8(tmp_path):
    for mode, (img, expected) in _mode_images().items():
        path = tmp_path / f"{mode}.png"
        img.save(path)
        assert Image.open(path).mode == {"gray": "L", "rgba": "RGBA", "gray16": "I;16"}[mode]
        rgb = read_image_rgb(str(path))
        assert rgb.mode == "RGB"
        # PIL's convert("RGB") turns most of a 16-bit image white; this scales it.
        np.testing.assert_array_equal(np.asarray(rgb), expected, err_msg=mode)


def test_grayscale_rgba_16bit_train_and_infer(tiny_coco, tmp_path, register_coco):
    """A dataset of grayscale, RGBA and 16-bit PNGs trains 2 iterations and runs inference;
    the mapper feeds the model the right RGB (or BGR) pixels."""
    from nfdet.detection import NFNetTrainer

    data, _, image_dir = _coco(tiny_coco)
    images = _mode_images()
    for img_info, (mode, (_, _)) in zip(data["images"], images.items()):
        source = Image.open(image_dir / img_info["file_name"])
        converted = {"gray": source.convert("L"), "rgba": source.convert("RGBA"),
                     "gray16": Image.fromarray(np.asarray(source.convert("L")).astype(
                         np.uint16) * 257)}[mode]
        img_info["file_name"] = f"{mode}.png"
        converted.save(image_dir / img_info["file_name"])
    name = register_coco("modes", write_json(data, tmp_path / "modes.json"), image_dir)
    records = {Path(r["file_name"]).stem: r for r in DatasetCatalog.get(name)}

    cfg = tiny_coco_cfg(name, INPUT__MIN_SIZE_TEST=0, OUTPUT_DIR=tmp_path / "out",
                         SOLVER__MAX_ITER=2, SOLVER__CHECKPOINT_PERIOD=100, TEST__EVAL_PERIOD=0)
    for mode in images:
        source = np.asarray(Image.open(image_dir / f"{mode}.png"))
        if mode == "rgba":
            expected = source[..., :3]
        else:  # gray, or gray16 = gray * 257
            gray = (source // 257).astype(np.uint8) if mode == "gray16" else source
            expected = np.repeat(gray[..., None], 3, 2)
        for fmt in ("RGB", "BGR"):
            cfg.defrost()
            cfg.INPUT.FORMAT = fmt
            image = NFNetDatasetMapper(cfg, False)(records[mode])["image"]
            hwc = image.permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(hwc if fmt == "RGB" else hwc[..., ::-1], expected)
    cfg.INPUT.FORMAT = "RGB"
    cfg.freeze()

    torch.manual_seed(0)
    trainer = NFNetTrainer(cfg)  # its train and test loaders read with NFNetDatasetMapper
    trainer.train()  # 2 iterations
    assert trainer.iter == 2
    assert np.isfinite(trainer.storage.history("total_loss").latest())
    results = NFNetTrainer.test(cfg, trainer.model)  # NFNetDatasetMapper + COCO AP
    assert set(results) == {"bbox", "segm"}
