"""Classification datasets and loaders for pretraining.

Three dataset formats (``DATA.FORMAT``):

- ``"folder"``: ImageNet's layout, ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>``;
  classes are the sorted folder names (as torchvision's ImageFolder), scanned with ``os.scandir``.
- ``"filelist"``: a UTF-8 text file with one ``relative/path label`` line per image (paths relative
  to ``DATA.ROOT``, the label an integer after the last space). This is the path for datasets a
  folder walk cannot serve (tens of millions of images, network file systems): the list is read
  once, sequentially, and ``write_file_list`` makes one from a folder dataset.
- ``"wds"``: WebDataset tar shards (``nfdet.classification.shards``; ``tools/make_shards.py``
  writes them from either of the above): read sequentially, split across processes and loader
  workers by shard, and only a shard list held in memory.

Paths are kept in one numpy byte buffer plus offsets rather than a Python list, so DataLoader
workers (forked) do not touch millions of refcounts and copy the parent's memory page by page.

Bad images (docs/reliability.md): every image is decoded to 8-bit RGB whatever its mode
(grayscale, palette, RGBA, 16-bit; ``nfdet.data.validate.to_rgb_uint8``). In the training set an
image that cannot be read (missing, truncated, not an image) is logged with its path and a running
count and replaced by the next readable image of the dataset (deterministically, so seeds and
batch sizes are unchanged); training stops with ``ImageReadError`` once more than
``max(10, 1%)`` of the images are bad. In the validation set a bad image stops the run with its
path. A file list's first entries are checked to exist up front, so a wrong ``DATA.ROOT`` fails
at once.

Sampling: ``EpochBatchSampler`` shuffles each pass over the data with a generator seeded by
``(seed, pass)``, drops the incomplete last step, and splits every optimizer step's source images
into ``ACCUM_STEPS`` micro-batches, each cut into one slice per process; it can start at any step
of a pass (resume). With MixUp/CutMix a step reads two source images per training example
(``nfdet.classification.mixing``). Every sample carries its own seed (from ``(seed, pass,
position)``): the dataset runs its per-image transform under it and the batch stage
(``transforms.TrainCollate``) seeds each pair's mixing and RandAugment from it, so augmentation
does not depend on the number of workers, their scheduling or on a resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.validate import DatasetError, ImageReadError, read_image_rgb
from .shards import (
    ShardedDataset,
    build_shard_dataset,
    build_shard_test_loader,
    build_shard_train_loader,
    resolve_shards,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassificationDataset",
    "scan_image_folder",
    "read_file_list",
    "write_file_list",
    "EpochBatchSampler",
    "build_dataset",
    "check_data_paths",
    "build_train_loader",
    "build_test_loader",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
# Training stops once more than this share of the images (and at least MIN_BAD_IMAGES) could not
# be read. File lists: this many first entries are checked to exist before training.
MAX_BAD_IMAGE_FRACTION = 0.01
MIN_BAD_IMAGES = 10
FILE_LIST_CHECK = 100

logger = logging.getLogger(__name__)


class _PathTable:
    """Many strings stored as one byte buffer and offsets (fork/copy-on-write friendly)."""

    def __init__(self, paths: Sequence[str]):
        encoded = [p.encode("utf-8") for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._buffer[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8")


def scan_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """List the images of an ImageNet-style folder.

    Args:
        root (str): a folder of class folders.

    Returns:
        tuple: (paths relative to ``root``, labels, class names sorted).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        DatasetError: no class folders, or a class folder without images (named).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Dataset folder {root!r} does not exist (expected ROOT/<split>/<class>/<image>; "
            "set DATA.ROOT / DATA.TRAIN_SPLIT / DATA.VAL_SPLIT)"
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DatasetError(f"Dataset folder {root!r} has no class sub-folders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            e.name
            for e in os.scandir(os.path.join(root, name))
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise DatasetError(
                f"Class folder {os.path.join(root, name)!r} holds no images "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        paths.extend(f"{name}/{f}" for f in files)
        labels.extend([label] * len(files))
    return paths, labels, classes


def read_file_list(path: str) -> tuple[list[str], list[int]]:
    """Read a ``relative/path label`` file list (the label after the last space).

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: a malformed line (file and line number named) or an empty list, or a
            file that is not UTF-8 text.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"File list {path!r} does not exist (DATA.FORMAT 'filelist')")
    paths, labels = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            rel, _, label = line.rpartition(" ")
            try:
                value = int(label)
            except ValueError:
                value = -1
            if not rel or value < 0:
                raise DatasetError(
                    f"{path}:{lineno}: expected 'relative/path label' with an integer label "
                    f">= 0, got {line!r}"
                )
            paths.append(rel)
            labels.append(value)
    if not paths:
        raise DatasetError(f"File list {path!r} is empty")
    return paths, labels


def write_file_list(folder: str, out_path: str) -> int:
    """Write the file list of an ImageNet-style folder (paths relative to the folder's parent).

    Use it once to turn ``ROOT/train`` into ``ROOT/train.txt`` for ``DATA.FORMAT 'filelist'``.

    Returns:
        int: number of images listed.
    """
    paths, labels, _ = scan_image_folder(folder)
    prefix = os.path.basename(os.path.normpath(folder))
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p, label in zip(paths, labels):
            f.write(f"{prefix}/{p} {label}\n")
    os.replace(tmp, out_path)
    return len(paths)


class ClassificationDataset(Dataset):
    """Images and integer labels; a sample is ``(uint8 CHW tensor, label)``.

    Indexing with ``(index, seed)`` hands the seed to a transform that takes one (a
    ``takes_seed`` attribute, as ``transforms.TrainImageTransform``), else runs the transform
    with torch's CPU generator seeded by it (in a forked RNG state, so the caller's stream is
    untouched); a plain ``index`` uses the ambient RNG.

    Args:
        root (str): folder the paths are relative to.
        paths (list[str]): image paths.
        labels (list[int]): labels.
        transform (callable): PIL image -> tensor.
        classes (list[str] | None): class names, when known.
        skip_unreadable (bool): replace an unreadable image by the next readable one (with a
            warning) instead of raising ``ImageReadError``; for training sets.
    """

    def __init__(
        self,
        root: str,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable,
        classes: Sequence[str] | None = None,
        skip_unreadable: bool = False,
    ):
        self.root = root
        self._paths = _PathTable(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.classes = list(classes) if classes is not None else None
        self.skip_unreadable = skip_unreadable
        self.max_bad_images = max(MIN_BAD_IMAGES, int(MAX_BAD_IMAGE_FRACTION * len(paths)))
        # Indices found unreadable; per DataLoader worker (each holds its own copy).
        self.bad_indices: set[int] = set()

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self._paths[index])

    def _load(self, index: int, seed: int | None = None) -> tuple[torch.Tensor, int]:
        """(transformed image, index actually read): ``index``, or with ``skip_unreadable``
        the next readable one."""
        start = index
        while True:
            if index not in self.bad_indices:
                try:
                    image = read_image_rgb(self.path(index))
                    if seed is not None:
                        return self.transform(image, seed), index
                    return self.transform(image), index
                except ImageReadError as e:
                    if not self.skip_unreadable:
                        raise
                    self._skip(index, e)
            index = (index + 1) % len(self)
            if index == start:
                raise ImageReadError(f"No image of {self.root!r} can be read", self.root)

    def _skip(self, index: int, error: ImageReadError) -> None:
        self.bad_indices.add(index)
        count = len(self.bad_indices)
        logger.warning("Skipping image %d (replaced by the next one): %s", count, error)
        if count > self.max_bad_images:
            raise ImageReadError(
                f"{count} images of {self.root!r} could not be read (limit "
                f"{self.max_bad_images}; the last: {self.path(index)!r}): the dataset looks "
                "broken, stopping", self.path(index)
            )

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        if isinstance(item, tuple):
            index, seed = item
            if getattr(self.transform, "takes_seed", False):
                image, index = self._load(index, seed)
            else:
                with torch.random.fork_rng(devices=[]):
                    # The CPU generator only: torch.manual_seed would also queue CUDA seeds
                    # (which fork_rng(devices=[]) does not restore) and is slow per image
                    # (docs/benchmarks.md, "Data loading").
                    torch.default_generator.manual_seed(seed)
                    image, index = self._load(index)
        else:
            image, index = self._load(item)
        return image, int(self.labels[index])


def build_dataset(cfg, split: str, transform: Callable) -> ClassificationDataset | ShardedDataset:
    """Build the train or val dataset from ``cfg.DATA``.

    Args:
        cfg (CfgNode): the config.
        split (str): "train" or "val".
        transform (callable): the per-image transform.

    Raises:
        FileNotFoundError: a missing folder or list (named).
        DatasetError: an empty class, a bad label, a missing shard (named), or one of the first
            ``FILE_LIST_CHECK`` files of a file list is missing.
    """
    data = cfg.DATA
    name = data.TRAIN_SPLIT if split == "train" else data.VAL_SPLIT
    fmt = data.FORMAT.lower()
    if fmt == "wds":
        return build_shard_dataset(cfg, split, transform)
    if fmt == "folder":
        root = os.path.join(data.ROOT, name)
        paths, labels, classes = scan_image_folder(root)
    elif fmt == "filelist":
        root = data.ROOT
        list_path = os.path.join(data.ROOT, name)
        paths, labels = read_file_list(list_path)
        classes = None
        missing = [p for p in paths[:FILE_LIST_CHECK] if not os.path.isfile(os.path.join(root, p))]
        if missing:
            raise DatasetError(
                f"{list_path}: {len(missing)} of its first {min(len(paths), FILE_LIST_CHECK)} "
                f"images do not exist under DATA.ROOT {root!r}, e.g. {missing[0]!r}"
            )
    else:
        raise DatasetError(
            f"DATA.FORMAT must be 'folder', 'filelist' or 'wds', got {data.FORMAT!r}")
    num_classes = cfg.MODEL.NUM_CLASSES
    if max(labels) >= num_classes:
        raise DatasetError(
            f"The {split} data at {os.path.join(data.ROOT, name)!r} has label {max(labels)} "
            f"(classes: {max(labels) + 1}), but MODEL.NUM_CLASSES is {num_classes}"
        )
    return ClassificationDataset(root, paths, labels, transform, classes,
                                 skip_unreadable=split == "train")


class EpochBatchSampler(Sampler):
    """Per-process micro-batches of ``(index, sample_seed)``, one pass over the data at a time,
    resumable at any optimizer step.

    Step ``s`` of a pass reads the source positions ``[s * S, (s + 1) * S)`` of the pass's
    shuffled order, ``S = global_batch * sources_per_example``; micro-batch ``m`` of process ``r``
    is slice ``m * world_size + r`` of ``accum_steps * world_size`` equal slices of them.

    Args:
        dataset_size (int): number of samples.
        global_batch (int): training examples per optimizer step over all processes.
        rank (int): this process.
        world_size (int): number of processes.
        seed (int): the run's seed.
        sources_per_example (int): source images per training example (2 with mixing).
        accum_steps (int): micro-batches per optimizer step.
    """

    def __init__(self, dataset_size: int, global_batch: int, rank: int, world_size: int,
                 seed: int, sources_per_example: int = 1, accum_steps: int = 1):
        if global_batch % (world_size * accum_steps):
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({global_batch}) must be divisible by SOLVER.ACCUM_STEPS "
                f"({accum_steps}) x the number of processes ({world_size})"
            )
        self.step_sources = global_batch * sources_per_example
        self.steps_per_epoch = dataset_size // self.step_sources
        if self.steps_per_epoch == 0:
            reads = (f"{global_batch} x {sources_per_example} source images (MixUp/CutMix pair "
                     "two per example)" if sources_per_example > 1 else f"{global_batch} images")
            raise DatasetError(
                f"SOLVER.IMS_PER_BATCH is larger than the training set: a step reads {reads}, "
                f"the training set has {dataset_size}"
            )
        self.dataset_size = dataset_size
        self.global_batch = global_batch
        self.accum_steps = accum_steps
        self.world_size = world_size
        self.micro_sources = self.step_sources // (world_size * accum_steps)
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the pass and the optimizer step within it to start from (for resuming)."""
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=g).tolist()
        # One seed per position in the pass: the same sample sees the same augmentation
        # whichever process, worker or resumed run loads it.
        seeds = torch.randint(2**62, (self.dataset_size,), generator=g).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            for micro in range(self.accum_steps):
                begin = step * self.step_sources + (
                    micro * self.world_size + self.rank) * self.micro_sources
                yield [(order[p], seeds[p]) for p in range(begin, begin + self.micro_sources)]


class _SeededSamples(Dataset):
    """``dataset[(index, seed)]`` with the seed appended: ``(image, label, seed)`` for the
    batch stage, which seeds each pair's mixing and RandAugment from it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        image, label = self.dataset[item]
        return image, label, item[1]


def _loader_kwargs(cfg) -> dict:
    workers = cfg.DATA.NUM_WORKERS
    kwargs = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=cfg.DATA.PREFETCH_FACTOR)
    return kwargs


def build_train_loader(cfg, dataset: Dataset, rank: int, world_size: int, seed: int,
                       collate_fn: Callable | None = None,
                       ) -> tuple[DataLoader, EpochBatchSampler]:
    """The train loader and its sampler (call ``sampler.set_epoch`` before each pass).

    Each loader batch is one micro-batch of this process, already through the batch stage
    (``collate_fn``, by default ``transforms.build_train_collate(cfg)``: mixing, RandAugment),
    in the loader's workers.

    Args:
        cfg (CfgNode): the config.
        dataset (Dataset): the training set (``ClassificationDataset``).
        rank, world_size (int): this process and the number of processes.
        seed (int): the run's seed (drawn when ``SEED < 0``); every stream derives from it.
        collate_fn (callable | None): the batch stage.
    """
    from .transforms import build_train_collate

    if collate_fn is None:
        collate_fn = build_train_collate(cfg)
    if isinstance(dataset, ShardedDataset):
        loader, shard_sampler = build_shard_train_loader(cfg, dataset, rank, world_size, seed,
                                                         collate_fn, _loader_kwargs(cfg))
        _check_pairing(cfg, collate_fn, shard_sampler.micro_sources)
        return loader, shard_sampler
    sources = getattr(collate_fn, "sources_per_example", 1)
    sampler = EpochBatchSampler(len(dataset), cfg.SOLVER.IMS_PER_BATCH, rank, world_size, seed,
                                sources_per_example=sources,
                                accum_steps=cfg.SOLVER.ACCUM_STEPS)
    _check_pairing(cfg, collate_fn, sampler.micro_sources)
    # A private generator: creating an iterator must not consume the global torch RNG.
    loader = DataLoader(_SeededSamples(dataset), batch_sampler=sampler, collate_fn=collate_fn,
                        generator=torch.Generator(), **_loader_kwargs(cfg))
    return loader, sampler


def _check_pairing(cfg, collate_fn: Callable, micro_sources: int) -> None:
    if getattr(collate_fn, "sources_per_example", 1) > 1:
        # Checked here (not in a worker) so that a bad batch size fails before training.
        from .mixing import pair_indices

        pair_indices(micro_sources, cfg.INPUT.MIXUP_ALPHA, cfg.INPUT.CUTMIX_ALPHA)


def build_test_loader(cfg, dataset: Dataset, rank: int, world_size: int) -> DataLoader:
    """Eval loader over this process's share ``rank::world_size`` of the images (of the shards
    with ``DATA.FORMAT 'wds'``): no padding, no duplicates."""
    kwargs = _loader_kwargs(cfg)
    kwargs["persistent_workers"] = False
    if isinstance(dataset, ShardedDataset):
        return build_shard_test_loader(cfg, dataset, rank, world_size, kwargs)
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=cfg.TEST.IMS_PER_BATCH,
        shuffle=False,
        generator=torch.Generator(),
        **kwargs,
    )


def check_data_paths(cfg) -> None:
    """Cheap up-front checks of ``cfg.DATA`` (before processes start): the split folders, file
    lists or shards exist (shard sizes match ``info.json``).

    Raises:
        FileNotFoundError / DatasetError: one line naming the path or key at fault.
    """
    data = cfg.DATA
    fmt = data.FORMAT.lower()
    for key in ("TRAIN_SPLIT", "VAL_SPLIT"):
        name = getattr(data, key)
        if not name and key == "VAL_SPLIT":
            continue
        where = os.path.join(data.ROOT, name)
        if fmt == "wds":
            resolve_shards(name, data.ROOT)
        elif fmt == "folder" and not os.path.isdir(where):
            if not os.path.isdir(data.ROOT):
                raise FileNotFoundError(f"DATA.ROOT {data.ROOT!r} does not exist")
            raise FileNotFoundError(f"Dataset folder {where!r} does not exist (DATA.{key} "
                                    f"{name!r} under DATA.ROOT)")
        elif fmt == "filelist" and not os.path.isfile(where):
            raise FileNotFoundError(f"File list {where!r} does not exist (DATA.{key} {name!r} "
                                    "under DATA.ROOT; DATA.FORMAT 'filelist')")
