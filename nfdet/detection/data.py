"""COCO-format datasets for detectron2, checked before training, and a mapper that survives bad
image files.

- ``register_checked_coco`` registers a COCO instances file whose loader is
  ``load_checked_coco_instances``: the file is read and checked by
  ``nfdet.data.validate.check_coco_dict`` (structural problems are errors naming the file and
  id; untrainable annotations are dropped and counted; image files must exist), then turned into
  detectron2's dataset dicts. ``--register-coco`` uses it.
- ``check_dataset_names`` runs in the launching process before any worker starts: every name in
  ``DATASETS.TRAIN`` / ``DATASETS.TEST`` must be registered (close names are suggested) and the
  annotation file and image folder of a COCO dataset must exist (builtin datasets: under
  ``$DETECTRON2_DATASETS``).
- ``NFNetDatasetMapper`` reads every image as 8-bit RGB whatever its mode (grayscale, RGBA,
  16-bit, ...; see ``nfdet.data.validate.to_rgb_uint8``), then converts to ``INPUT.FORMAT``. In
  training, an image that cannot be decoded (truncated, not an image) or whose size differs from
  its annotation is skipped with a warning naming it and a running count, and another image takes
  its place; the run stops with ``ImageReadError`` once more than ``max(10, 1%)`` of the images
  are bad, or when none can be read (counted per data-loader worker). In evaluation, a bad image
  stops the run with the file named (skipping one would change the AP).
- ``load_train_dataset`` loads ``DATASETS.TRAIN`` as detectron2 does and checks what would only
  fail inside the training loop (annotations without masks under ``MODEL.MASK_ON``, RLE masks
  with ``INPUT.MASK_FORMAT polygon``, nothing left to train on).

The data loaders built on these (the resumable training loader, the test loader) are in
``nfdet.detection.loader``.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    get_detection_dataset_dicts,
)
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from ..data.validate import DatasetError, ImageReadError, load_checked_coco, read_image_rgb

__all__ = [
    "DatasetError",
    "ImageReadError",
    "load_checked_coco_instances",
    "register_checked_coco",
    "check_dataset_names",
    "NFNetDatasetMapper",
    "load_train_dataset",
]

logger = logging.getLogger(__name__)

# Training stops once more than this share of the images (and at least MIN_BAD_IMAGES) could not
# be read: a few corrupt files are skipped, a broken copy of the dataset is not trained on.
MAX_BAD_IMAGE_FRACTION = 0.01
MIN_BAD_IMAGES = 10


def load_checked_coco_instances(json_file: str, image_root: str,
                                dataset_name: str | None = None) -> list[dict]:
    """Read and check a COCO instances file and return detectron2's dataset dicts.

    Category ids are mapped to contiguous ids in id order; with ``dataset_name`` the metadata
    gets ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` (as detectron2's
    ``load_coco_json``). What was dropped or clipped is logged as a warning with counts per
    reason and example annotation ids.

    Raises:
        FileNotFoundError: the JSON file is missing.
        DatasetError: invalid JSON, a structural error, or missing image files (named).
    """
    data, report = load_checked_coco(json_file, image_root)
    if report.num_dropped or report.dropped_polygons or report.clipped:
        logger.warning("Checked %s", report.summary())
    else:
        logger.info("Checked %s", report.summary())
    categories = sorted(data["categories"], key=lambda c: c["id"])
    id_map = {c["id"]: i for i, c in enumerate(categories)}
    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        meta.thing_classes = [c["name"] for c in categories]
        meta.thing_dataset_id_to_contiguous_id = id_map

    per_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        obj: dict[str, Any] = {
            "bbox": ann["bbox"],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": id_map[ann["category_id"]],
            "iscrowd": ann["iscrowd"],
        }
        segm = ann.get("segmentation")
        if isinstance(segm, dict) and isinstance(segm["counts"], list):
            import pycocotools.mask as mask_util

            # detectron2 decodes compressed RLE only.
            segm = mask_util.frPyObjects(segm, *segm["size"])
        if segm:
            obj["segmentation"] = segm
        keypoints = ann.get("keypoints")
        if keypoints:
            # COCO keypoints are integer pixel indices; detectron2 wants pixel centres.
            obj["keypoints"] = [v + 0.5 if i % 3 != 2 else v for i, v in enumerate(keypoints)]
        per_image.setdefault(ann["image_id"], []).append(obj)

    records = []
    for img in sorted(data["images"], key=lambda i: i["id"]):
        records.append({
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": img["height"],
            "width": img["width"],
            "image_id": img["id"],
            "annotations": per_image.get(img["id"], []),
        })
    return records


def register_checked_coco(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO instances dataset loaded by ``load_checked_coco_instances``.

    The metadata holds ``json_file``, ``image_root`` and ``evaluator_type="coco"`` (as
    detectron2's ``register_coco_instances``), so ``COCOEvaluator`` scores it against the file
    as given.
    """
    DatasetCatalog.register(
        name, lambda: load_checked_coco_instances(json_file, image_root, name)
    )
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                  evaluator_type="coco")


def check_dataset_names(cfg) -> None:
    """Check ``DATASETS.TRAIN`` / ``DATASETS.TEST`` before any long work starts.

    Raises:
        DatasetError: a name is not registered (close names listed), or a COCO dataset's
            annotation file or image folder does not exist.
    """
    available = DatasetCatalog.list()
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in available:
                close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
                hint = (f"; did you mean {', '.join(map(repr, close))}?" if close else
                        "; register a COCO-format dataset with --register-coco NAME JSON "
                        "IMAGE_DIR")
                raise DatasetError(f"DATASETS.{key}: dataset {name!r} is not registered{hint}")
            meta = MetadataCatalog.get(name)
            for field, what, exists in (("json_file", "annotation file", os.path.isfile),
                                        ("image_root", "image folder", os.path.isdir)):
                path = getattr(meta, field, None)
                if path and not exists(path):
                    raise DatasetError(
                        f"DATASETS.{key}: dataset {name!r}: {what} {path!r} does not exist "
                        "(detectron2's builtin datasets live under $DETECTRON2_DATASETS, now "
                        f"{os.environ.get('DETECTRON2_DATASETS', 'datasets')!r})"
                    )


class NFNetDatasetMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` with nfdet's image reading (see the module docstring).

    Args:
        cfg (CfgNode): the config (as for ``DatasetMapper``).
        is_train (bool): training (skip bad images) or evaluation (stop on one).
        dataset_size (int | None): images in the dataset, for the bad-image limit.
    """

    def __init__(self, cfg, is_train: bool = True, dataset_size: int | None = None):
        super().__init__(cfg, is_train)
        self.dataset_size = dataset_size
        self.max_bad_images = max(
            MIN_BAD_IMAGES, int(MAX_BAD_IMAGE_FRACTION * (dataset_size or 0))
        )
        # (image_id, file_name) of the bad images; per data-loader worker (each holds its own
        # copy of the mapper).
        self.bad_images: set[tuple] = set()

    def read_image(self, dataset_dict: dict) -> np.ndarray:
        """The image of ``dataset_dict`` in ``INPUT.FORMAT`` (HWC).

        Raises:
            ImageReadError: unreadable, or not the size the annotation says.
        """
        file_name = dataset_dict["file_name"]
        rgb = read_image_rgb(file_name, exif_transpose=True)
        expected = (dataset_dict.get("width"), dataset_dict.get("height"))
        if None not in expected and rgb.size != expected:
            raise ImageReadError(
                f"Image {file_name!r} is {rgb.size[0]}x{rgb.size[1]} (width x height) but its "
                f"annotation says {expected[0]}x{expected[1]}", file_name
            )
        return utils.convert_PIL_to_numpy(rgb, self.image_format)

    def _skip(self, key: tuple, error: ImageReadError) -> None:
        file_name = key[1]
        self.bad_images.add(key)
        count = len(self.bad_images)
        logger.warning("Skipping image %d: %s", count, error)
        if self.dataset_size and count >= self.dataset_size:
            raise ImageReadError(
                f"None of the {count} images of the dataset could be read (the last: "
                f"{file_name!r}), stopping", file_name
            )
        if count > self.max_bad_images:
            raise ImageReadError(
                f"{count} images could not be read (limit {self.max_bad_images}; the last: "
                f"{file_name!r}): the dataset looks broken, stopping", file_name
            )

    def __call__(self, dataset_dict: dict) -> dict | None:
        key = (dataset_dict.get("image_id"), dataset_dict["file_name"])
        if self.is_train and key in self.bad_images:
            return None  # known bad: the loader (ResumableTrainLoader) picks another image
        try:
            image = self.read_image(dataset_dict)
        except ImageReadError as e:
            if not self.is_train:
                raise
            self._skip(key, e)
            return None
        dataset_dict = copy.deepcopy(dataset_dict)
        sem_seg = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms,
                                      proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict


def _check_masks(cfg, dataset: Sequence[dict]) -> None:
    """With ``MODEL.MASK_ON`` every trained annotation needs a mask (detectron2 otherwise fails
    in the mask head), and RLE masks need ``INPUT.MASK_FORMAT bitmask`` (with "polygon" it fails
    while building the batch)."""
    if not cfg.MODEL.MASK_ON:
        return
    names = ", ".join(cfg.DATASETS.TRAIN)
    for record in dataset:
        for obj in record.get("annotations", []):
            if obj.get("iscrowd", 0):
                continue  # crowd regions are not trained on
            segm = obj.get("segmentation")
            if not segm:
                raise DatasetError(
                    f"{names}: image {record['file_name']!r} has an annotation without a mask, "
                    "but MODEL.MASK_ON is True; give every annotation a segmentation or set "
                    "MODEL.MASK_ON False"
                )
            if isinstance(segm, dict) and cfg.INPUT.MASK_FORMAT == "polygon":
                raise DatasetError(
                    f"{names}: image {record['file_name']!r} has RLE masks, which "
                    "INPUT.MASK_FORMAT 'polygon' cannot train on; set INPUT.MASK_FORMAT bitmask"
                )


def load_train_dataset(cfg) -> list[dict]:
    """The dataset dicts of ``DATASETS.TRAIN`` as detectron2's train loader filters them, checked
    for what would otherwise fail inside the training loop.

    Raises:
        DatasetError: no usable image (e.g. every annotation dropped); with ``MODEL.MASK_ON``,
            an annotation without a mask, or RLE masks with ``INPUT.MASK_FORMAT polygon``.
    """
    try:
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                           if cfg.MODEL.KEYPOINT_ON else 0),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
    except AssertionError as e:  # detectron2 asserts "No valid data found in ..." / "is empty"
        raise DatasetError(
            f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}: nothing to train on ({e}); images "
            "without usable annotations are left out while DATALOADER.FILTER_EMPTY_ANNOTATIONS "
            "is True (see the warnings above for dropped annotations)"
        ) from None
    _check_masks(cfg, dataset)
    return list(dataset)
