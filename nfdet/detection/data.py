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
- ``build_train_loader`` is ``NFNetTrainer``'s training loader: a ``ResumableTrainLoader``
  (batch ``i`` depends only on the run seed, ``i`` and the rank, so ``--resume`` is exact; see
  ``nfdet.detection.trainer``) over ``load_train_dataset`` with that mapper.
  ``build_test_loader`` is detectron2's test loader with that mapper.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from detectron2.data import (
    DatasetCatalog,
    DatasetFromList,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ..data.validate import DatasetError, ImageReadError, load_checked_coco, read_image_rgb

__all__ = [
    "DatasetError",
    "ImageReadError",
    "load_checked_coco_instances",
    "register_checked_coco",
    "check_dataset_names",
    "NFNetDatasetMapper",
    "load_train_dataset",
    "derive_seed",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "build_train_loader",
    "build_test_loader",
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
            json_file = getattr(meta, "json_file", None)
            image_root = getattr(meta, "image_root", None)
            builtin = (" (detectron2's builtin datasets live under $DETECTRON2_DATASETS, now "
                       f"{os.environ.get('DETECTRON2_DATASETS', 'datasets')!r})")
            if json_file and not os.path.isfile(json_file):
                raise DatasetError(
                    f"DATASETS.{key}: dataset {name!r}: annotation file {json_file!r} does not "
                    f"exist{builtin}"
                )
            if image_root and not os.path.isdir(image_root):
                raise DatasetError(
                    f"DATASETS.{key}: dataset {name!r}: image folder {image_root!r} does not "
                    f"exist{builtin}"
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


# Domain tags of derived seeds, so that model and data streams never coincide.
_MODEL_STREAM, _DATA_STREAM, _RETRY_STREAM = 0, 1, 2


def derive_seed(*entropy: int) -> int:
    """A 31-bit seed mixed from non-negative integers (numpy's ``SeedSequence``)."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint32)
    return int(state[0]) & 0x7FFFFFFF


@contextlib.contextmanager
def _forked_cpu_rngs(seed: int):
    """Run the block with Python, numpy and torch CPU RNGs seeded from ``seed``; restore them
    afterwards (the caller's streams are left exactly as they were)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.random.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _SeededMapDataset(torch.utils.data.Dataset):
    """``mapper(dataset_dicts[index])`` for keys ``(index, seed)``, with the sample's RNGs seeded
    from ``seed``. A sample the mapper drops (returns None) is replaced by others drawn from the
    same seed, so the replacement is reproducible too."""

    def __init__(self, dataset_dicts: DatasetFromList, mapper: Callable):
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        for attempt in range(100):
            with _forked_cpu_rngs(derive_seed(seed, attempt)):
                data = self.mapper(self.dataset_dicts[index])
            if data is not None:
                return data
            logger.warning("Failed to map dataset item %d (attempt %d); trying another", index,
                           attempt)
            index = random.Random(derive_seed(seed, attempt, _RETRY_STREAM)).randrange(len(self))
        raise RuntimeError(f"The mapper dropped 100 samples in a row (from index {index})")


class ResumableTrainLoader:
    """Infinite training batches of one process, positioned by iteration.

    Batch ``i`` (the data of iteration ``i``) depends only on (``seed``, ``i``, rank): the
    sampler's index stream is seeded, grouped into batches by aspect ratio at the index level,
    and each sample is mapped under RNGs seeded from (``seed``, ``i``, rank, position). Set
    ``seed`` and ``start_iter`` before iterating; iteration starts at batch ``start_iter``.

    Args:
        dataset_dicts (list[dict]): detectron2 dataset dicts.
        mapper (callable): dataset dict -> model input (``DatasetMapper``).
        sampler_factory (callable): seed -> infinite sampler of this process's indices.
        batch_size (int): images per batch of this process.
        aspect_ratio_grouping (bool): batch landscape and portrait images separately (by the
            dicts' ``width``/``height``; without them, no grouping).
        num_workers (int): loader worker processes (0: map in this process).
        seed (int): run seed.
    """

    def __init__(self, dataset_dicts: Sequence[dict], mapper: Callable,
                 sampler_factory: Callable[[int], Any], batch_size: int,
                 aspect_ratio_grouping: bool = True, num_workers: int = 0, seed: int = 0):
        self.group_ids = None
        if aspect_ratio_grouping and all("width" in d and "height" in d for d in dataset_dicts):
            self.group_ids = np.asarray(
                [0 if d["width"] > d["height"] else 1 for d in dataset_dicts], dtype=np.uint8
            )
        self.dataset = _SeededMapDataset(DatasetFromList(list(dataset_dicts), copy=False),
                                         mapper)
        self.sampler_factory = sampler_factory
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.start_iter = 0

    def batch_keys(self) -> Iterator[list[tuple[int, int]]]:
        """``[(dataset index, sample seed), ...]`` of every batch from ``start_iter`` on."""
        seed, start, rank = self.seed, self.start_iter, comm.get_rank()
        buckets: list[list[int]] = [[], []]
        iteration = 0
        for index in self.sampler_factory(seed):
            bucket = buckets[0 if self.group_ids is None else int(self.group_ids[index])]
            bucket.append(int(index))
            if len(bucket) < self.batch_size:
                continue
            if iteration >= start:
                yield [(i, derive_seed(seed, _DATA_STREAM, iteration, rank, j))
                       for j, i in enumerate(bucket)]
            bucket.clear()
            iteration += 1

    def __iter__(self) -> Iterator[list[dict]]:
        # Creating a multi-worker iterator draws from torch's RNG: keep that out of the
        # training stream.
        with torch.random.fork_rng(devices=[]):
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=_Batches(self),
                num_workers=self.num_workers,
                collate_fn=trivial_batch_collator,
            )
            iterator = iter(loader)
        yield from iterator


class _Batches:
    """Iterable view of ``loader.batch_keys()`` for ``DataLoader(batch_sampler=...)``."""

    def __init__(self, loader: ResumableTrainLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.loader.batch_keys()


def _sampler_factory(cfg, dataset_dicts: list[dict]) -> Callable[[int], Any] | None:
    """seed -> detectron2 sampler named by ``DATALOADER.SAMPLER_TRAIN`` (None if unsupported)."""
    name, size = cfg.DATALOADER.SAMPLER_TRAIN, len(dataset_dicts)
    if name == "TrainingSampler":
        return lambda seed: TrainingSampler(size, shuffle=True, seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT
        )
        return lambda seed: RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        ratio = cfg.DATALOADER.RANDOM_SUBSET_RATIO
        return lambda seed: RandomSubsetTrainingSampler(size, ratio, seed_shuffle=seed,
                                                         seed_subset=seed)
    return None


def build_resumable_train_loader(cfg, dataset: Sequence[dict] | None = None,
                                 mapper: Callable | None = None) -> ResumableTrainLoader | None:
    """A ``ResumableTrainLoader`` over ``DATASETS.TRAIN`` with the sampler of
    ``DATALOADER.SAMPLER_TRAIN``; its seed and start iteration are set by ``NFNetTrainer``.

    Args:
        cfg (CfgNode): the (worker-scaled) training config.
        dataset (list[dict] | None): dataset dicts (default: ``load_train_dataset(cfg)``).
        mapper (callable | None): dataset dict -> model input; returning None drops the sample
            (another takes its place). Default: ``NFNetDatasetMapper`` (any image mode read as
            RGB; unreadable training images skipped, see ``nfdet.detection.data``).

    Returns:
        ResumableTrainLoader | None: None for a sampler other than ``TrainingSampler``,
        ``RepeatFactorTrainingSampler`` and ``RandomSubsetTrainingSampler`` (a warning says so).

    Raises:
        DatasetError: see ``load_train_dataset`` (only when ``dataset`` is None).
    """
    if dataset is None:
        dataset = load_train_dataset(cfg)
    dataset = list(dataset)
    factory = _sampler_factory(cfg, dataset)
    if factory is None:
        logger.warning("DATALOADER.SAMPLER_TRAIN %s: detectron2's loader is used; --resume will "
                       "not continue its data order", cfg.DATALOADER.SAMPLER_TRAIN)
        return None
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by "
                         f"the number of processes ({world})")
    return ResumableTrainLoader(
        dataset,
        mapper if mapper is not None else NFNetDatasetMapper(cfg, True,
                                                             dataset_size=len(dataset)),
        factory,
        cfg.SOLVER.IMS_PER_BATCH // world,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def build_train_loader(cfg):
    """``NFNetTrainer``'s training loader: ``build_resumable_train_loader`` over
    ``load_train_dataset(cfg)``; for a ``DATALOADER.SAMPLER_TRAIN`` that loader does not support,
    detectron2's loader over the same dataset with ``NFNetDatasetMapper`` (``--resume`` then
    does not continue the data order).

    Raises:
        DatasetError: see ``load_train_dataset``.
    """
    dataset = load_train_dataset(cfg)
    loader = build_resumable_train_loader(cfg, dataset)
    if loader is None:
        mapper = NFNetDatasetMapper(cfg, True, dataset_size=len(dataset))
        loader = build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)
    return loader


def build_test_loader(cfg, dataset_name: str):
    """detectron2's test loader for ``dataset_name`` with ``NFNetDatasetMapper``."""
    return build_detection_test_loader(cfg, dataset_name, mapper=NFNetDatasetMapper(cfg, False))
