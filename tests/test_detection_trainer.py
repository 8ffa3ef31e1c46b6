"""NFNetTrainer pieces: the optimizer's AGC/weight-decay groups on a detector, AGC logging, the
test loader (nfdet's image reader) and the train loader (the checked dataset)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from helpers import quick_cfg, tiny_coco_cfg, truncate, write_json

from nfdet.data.validate import DatasetError, ImageReadError
from nfdet.detection import AGCStatsHook, NFNetTrainer
from nfdet.detection.loader import ResumableTrainLoader


def test_optimizer_clips_the_backbone_only():
    cfg = quick_cfg()
    model = build_model(cfg)
    optimizer = NFNetTrainer.build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    clipped, unclipped = set(), set()
    for group in optimizer.param_groups:
        target = clipped if group["agc_clipping"] is not None else unclipped
        target.update(names[id(p)] for p in group["params"])
        if group["agc_clipping"] is not None:
            # The clipping of the batch: CLIPPING at REFERENCE_BATCH_SIZE, scaled by sqrt.
            assert group["agc_clipping"] == pytest.approx(
                cfg.SOLVER.AGC.CLIPPING
                * (cfg.SOLVER.AGC.REFERENCE_BATCH_SIZE / cfg.SOLVER.IMS_PER_BATCH) ** 0.5)
    # The NF backbone, except its zero-initialised skip gains (docs/small_batch.md).
    assert clipped == {n for n in names.values()
                       if n.startswith("backbone.bottom_up.") and not n.endswith("skip_gain")}
    assert any(n.endswith("skip_gain") for n in unclipped)
    assert "roi_heads.box_predictor.cls_score.weight" in unclipped
    assert "backbone.fpn_lateral2.weight" in unclipped
    assert clipped | unclipped == set(names.values())


def test_agc_stats_hook_writes_the_clipped_fraction():
    cfg = quick_cfg()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    # Rename-free check: clip every parameter of this toy model.
    cfg.SOLVER.AGC.INCLUDE = ["*"]
    optimizer = NFNetTrainer.build_optimizer(cfg, model)
    model(torch.randn(3, 4)).pow(2).sum().mul(1e3).backward()
    optimizer.step()
    with EventStorage(0) as storage:
        hook = AGCStatsHook()
        hook.trainer = SimpleNamespace(optimizer=optimizer, storage=storage)
        hook.after_step()
        value = storage.latest()["agc_clipped_fraction"][0]
    # A huge gradient on a fresh layer: every unit (4 rows + the bias) is clipped.
    assert value == 1.0


def test_trainer_test_names_a_truncated_test_image(tiny_coco, tmp_path, register_coco):
    json_path, image_dir = tiny_coco
    truncated = truncate(image_dir / "0001.png")
    name = register_coco("eval", write_json(json.loads(json_path.read_text()), tmp_path / "a.json"),
                         image_dir)
    cfg = tiny_coco_cfg(name, OUTPUT_DIR=tmp_path / "out")
    model = NFNetTrainer.build_model(cfg)
    # PIL alone says "image file is truncated", without the file.
    with pytest.raises(ImageReadError, match=rf"Image '{truncated}' cannot be decoded"):
        NFNetTrainer.test(cfg, model)


def test_trainer_train_loader_checks_the_dataset(tiny_coco, tmp_path, register_coco):
    json_path, image_dir = tiny_coco
    data = json.loads(json_path.read_text())
    name = register_coco("ok", write_json(data, tmp_path / "ok.json"), image_dir)
    assert isinstance(NFNetTrainer.build_train_loader(tiny_coco_cfg(name)), ResumableTrainLoader)

    # Every annotation invalid (zero-size box): dropped, so no image is left to train on.
    bad = json.loads(json.dumps(data))
    for ann in bad["annotations"]:
        ann["bbox"][2] = 0.0
    name = register_coco("nothing", write_json(bad, tmp_path / "nothing.json"), image_dir)
    with pytest.raises(DatasetError, match=rf"DATASETS.TRAIN \('{name}',\): nothing to train on"):
        NFNetTrainer.build_train_loader(tiny_coco_cfg(name))

    # Boxes without masks under MODEL.MASK_ON: named before training, not in the mask head.
    boxes = json.loads(json.dumps(data))
    for ann in boxes["annotations"]:
        del ann["segmentation"]
    name = register_coco("boxes", write_json(boxes, tmp_path / "boxes.json"), image_dir)
    with pytest.raises(DatasetError, match=r"an annotation without a mask, but MODEL.MASK_ON"):
        NFNetTrainer.build_train_loader(tiny_coco_cfg(name))
