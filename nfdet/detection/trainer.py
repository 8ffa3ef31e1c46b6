"""detectron2 ``DefaultTrainer`` for NFNet detectors: nfdet optimizer (weight-decay groups + AGC),
COCO evaluation, AGC statistics in the event storage, nfdet classification checkpoints as
``MODEL.WEIGHTS``, and training that resumes exactly.

Exact resumption: a run killed at any moment and continued with ``--resume`` computes the same
losses as a run never interrupted (bit for bit on CPU). For that, nothing a step does may depend
on the history of the process:

- the data order is one seeded stream of indices, grouped into batches at the index level
  (aspect-ratio groups from the dataset's ``width``/``height``) and positioned by iteration: a
  resumed run replays the index stream (no image is read) up to its start iteration;
- every sample is mapped (augmented) under RNGs seeded from (run seed, iteration, rank, position
  in the batch), whichever process or loader worker maps it;
- before every step the RNGs of the model (proposal sampling, stochastic depth) are seeded from
  (run seed, iteration, rank).

The run seed is ``SEED`` when set (>= 0), otherwise drawn once and stored in every checkpoint, so
that a resumed run uses the seed of the run it continues.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from detectron2.data import DatasetFromList, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter

from ..solver import build_optimizer, get_agc_stats
from .checkpoint import NFNetCheckpointer
from .data import NFNetDatasetMapper

__all__ = [
    "NFNetTrainer",
    "AGCStatsHook",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "derive_seed",
]

logger = logging.getLogger(__name__)

# Domain tags of derived seeds, so that model and data streams never coincide.
_MODEL_STREAM, _DATA_STREAM, _RETRY_STREAM = 0, 1, 2


def derive_seed(*entropy: int) -> int:
    """A 31-bit seed mixed from non-negative integers (numpy's ``SeedSequence``)."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint32)
    return int(state[0]) & 0x7FFFFFFF


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and every GPU) global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        dataset (list[dict] | None): dataset dicts (default: ``DATASETS.TRAIN``, filtered as
            detectron2's ``build_detection_train_loader`` does).
        mapper (callable | None): dataset dict -> model input; returning None drops the sample
            (another takes its place). Default: ``NFNetDatasetMapper`` (any image mode read as
            RGB; unreadable training images skipped, see ``nfdet.detection.data``).

    Returns:
        ResumableTrainLoader | None: None for a sampler other than ``TrainingSampler``,
        ``RepeatFactorTrainingSampler`` and ``RandomSubsetTrainingSampler`` (a warning says so).
    """
    if dataset is None:
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
            if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS
            else None,
        )
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


class AGCStatsHook(HookBase):
    """After every step, put the optimizer's AGC statistics (``get_agc_stats``, e.g.
    ``agc_clipped_fraction``: clipped units / clipped-group units) into the event storage, so
    they reach metrics.json and TensorBoard. Nothing is written when AGC is off."""

    def after_step(self) -> None:
        stats = get_agc_stats(self.trainer.optimizer)
        if stats:
            self.trainer.storage.put_scalars(smoothing_hint=False, **stats)


class _SeedStepHook(HookBase):
    """Before every step, seed the global RNGs from (run seed, iteration, rank)."""

    def before_step(self) -> None:
        seed_all(derive_seed(self.trainer.seed, _MODEL_STREAM, self.trainer.iter,
                             comm.get_rank()))


class _WriteBeforeCheckpoint(HookBase):
    """Write the metrics of every finished iteration (metrics.json, TensorBoard, console) just
    before a checkpoint is saved, so that a run killed after the save and resumed from it has
    logged every iteration once. detectron2's ``PeriodicWriter`` alone writes every 20
    iterations, after the checkpoint."""

    def __init__(self, writers: list, period: int):
        self._writers = writers
        self._period = period

    def after_step(self) -> None:
        it, last = self.trainer.iter, self.trainer.iter >= self.trainer.max_iter - 1
        if last:
            # PeriodicWriter writes this step too: only what must be on disk before the save.
            for writer in self._writers:
                if not isinstance(writer, CommonMetricPrinter):
                    writer.write()
        elif self._period > 0 and (it + 1) % self._period == 0:
            for writer in self._writers:
                writer.write()


class NFNetTrainer(DefaultTrainer):
    """``DefaultTrainer`` with nfdet's optimizer, COCO evaluation, AGC logging, a checkpointer
    that reads nfdet classification checkpoints and writes atomically (``NFNetCheckpointer``),
    a data loader and RNG seeding that make ``--resume`` exact (see the module docstring), and
    a clear stop when the loss diverges.

    Args:
        cfg (CfgNode): detectron2 config with nfdet's keys.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seed = int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())
        # DefaultTrainer builds a plain DetectionCheckpointer; swap in ours, also in the periodic
        # checkpoint hook that already holds the old one.
        self.checkpointer = NFNetCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer
        self._position_loader()

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """``build_resumable_train_loader(cfg)`` (detectron2's loader for samplers it does not
        support)."""
        loader = build_resumable_train_loader(cfg)
        return loader if loader is not None else super().build_train_loader(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder: str | None = None
                        ) -> DatasetEvaluator:
        """COCO box (and mask, with ``MODEL.MASK_ON``) AP through pycocotools' COCOeval when
        detectron2's compiled evaluator is absent."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)

    def build_writers(self):
        self._writers = super().build_writers()
        return self._writers

    def build_hooks(self):
        ret = super().build_hooks()
        ret.insert(0, _SeedStepHook())
        # AGC statistics and a metrics write before the checkpointer, so that everything up to
        # a checkpoint is logged before it is saved.
        index = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer)),
                     None)
        if index is None:  # processes other than the main one save nothing
            index = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)) + 1
        ret.insert(index, AGCStatsHook())
        writers = getattr(self, "_writers", None)
        if writers and comm.is_main_process():
            period = self.cfg.SOLVER.CHECKPOINT_PERIOD
            ret.insert(index + 1, _WriteBeforeCheckpoint(writers, period))
        return ret

    # ------------------------------------------------------------------------------ resuming
    def _position_loader(self) -> None:
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.seed, loader.start_iter = self.seed, self.start_iter

    def resume_or_load(self, resume: bool = True) -> None:
        """detectron2's ``resume_or_load``; with a checkpoint, the run seed it stores is used and
        the data stream continues at the next iteration."""
        super().resume_or_load(resume=resume)
        self._position_loader()

    def state_dict(self) -> dict[str, Any]:
        ret = super().state_dict()
        ret["seed"] = self.seed
        return ret

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = copy.copy(state_dict)
        seed = state_dict.pop("seed", None)
        super().load_state_dict(state_dict)
        if seed is None:
            logger.warning("The checkpoint holds no run seed (written by another trainer): the "
                           "data order after --resume differs from an uninterrupted run's")
        elif int(seed) != self.seed:
            if self.cfg.SEED >= 0:
                logger.warning("SEED %d differs from the checkpoint's run seed %d; continuing "
                               "with the checkpoint's", self.cfg.SEED, int(seed))
            self.seed = int(seed)

    # ------------------------------------------------------------------------------ training
    def run_step(self) -> None:
        try:
            super().run_step()
        except FloatingPointError as e:
            last = self.checkpointer.last_good_checkpoint or (
                "none (this run has not saved or resumed one; nothing in "
                f"{self.cfg.OUTPUT_DIR} was written with diverged weights)"
            )
            raise FloatingPointError(
                "Training diverged: the loss (or the predictions it comes from) became NaN or "
                f"infinite at iteration {self.iter}. "
                f"Stopped without saving the diverged weights. Last good checkpoint: {last} "
                "(continue from it with --resume, e.g. with a lower SOLVER.BASE_LR or "
                f"SOLVER.AGC.CLIPPING). detectron2 reported: {e}"
            ) from e
