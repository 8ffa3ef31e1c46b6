"""Data loaders of ``NFNetTrainer``: a training loader that resumes exactly, and the test loader.

``ResumableTrainLoader`` yields the batches of one process positioned by iteration: batch ``i``
depends only on the run seed, ``i`` and the rank (a seeded index stream grouped into batches at
the index level; every sample mapped under RNGs seeded from its place in the run), so a run
continued with ``--resume`` sees the data an uninterrupted run would (see
``nfdet.detection.trainer``). Seeds are mixed by ``derive_seed`` from a stream tag
(``MODEL_STREAM``, ``DATA_STREAM``, ``RETRY_STREAM``) and positions, so the model's and the data's
random streams never coincide.

The datasets and the mapper (``load_train_dataset``, ``NFNetDatasetMapper``) are in
``nfdet.detection.data``.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from detectron2.data import (
    DatasetFromList,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.utils import comm

from .data import NFNetDatasetMapper, load_train_dataset

__all__ = [
    "MODEL_STREAM",
    "DATA_STREAM",
    "RETRY_STREAM",
    "derive_seed",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "build_train_loader",
    "build_test_loader",
]

logger = logging.getLogger(__name__)

# Domain tags of derived seeds, so that model and data streams never coincide.
MODEL_STREAM, DATA_STREAM, RETRY_STREAM = 0, 1, 2


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
            index = random.Random(derive_seed(seed, attempt, RETRY_STREAM)).randrange(len(self))
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
                yield [(i, derive_seed(seed, DATA_STREAM, iteration, rank, j))
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
