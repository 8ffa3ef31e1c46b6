"""Sharded datasets (``DATA.FORMAT 'wds'``): WebDataset tar shards for pretraining.

A shard is a plain tar file (the format of the ``webdataset`` package, which timm and OpenCLIP
read) of samples: members ``<key>.<image ext>`` (``DATA.WDS.IMAGE_KEYS``, e.g. ``jpg``) and
``<key>.cls`` (``DATA.WDS.LABEL_KEY``: the integer label as ASCII), consecutive in the tar.
``write_shards`` (``tools/make_shards.py``) makes them from an ImageNet-layout folder or a file
list, with an ``info.json`` beside them (samples, classes, and the samples and bytes per shard).

Shards are named by ``DATA.TRAIN_SPLIT`` / ``DATA.VAL_SPLIT``: brace patterns
(``/data/train-{000000..001023}.tar``), several joined by ``::`` (webdataset's convention) to
make a list, or a folder (its ``info.json``'s shards, else all its ``*.tar``); relative to
``DATA.ROOT`` unless absolute.

Training order (``ShardBatchSampler`` + ``ShardSamples``): each process has ``R`` readers (one per
loader worker, at least one); reader ``v`` of process ``r`` is global reader ``g = r * R + v`` of
``G = world_size * R``. In pass ``p`` the shard list is permuted from ``(seed, p)`` and reader
``g`` reads shards ``g, g + G, ...`` of that permutation, whole and in tar order (cycling over
them if its share falls short), through a shuffle buffer of ``DATA.WDS.SHUFFLE_BUFFER`` samples
seeded from ``(seed, p, g)``. Shards are thus split across machines, processes and workers
without overlap. A pass has ``len // (IMS_PER_BATCH x sources per example)`` optimizer steps, as
with the folder format; micro-batch ``i`` of a process in the pass is the next ``micro-batch``
samples of its reader ``i % R``, so the stream is a fixed function of (seed, pass, process,
micro-batch), whichever worker loads it. The loader hands micro-batch ``start + k + j W`` to its
worker ``k`` (``W`` workers), so each worker keeps one reader open; one asked for another
position (a resume: ``set_epoch(pass, step)``) opens the reader and skips to it, reading the
skipped samples' bytes without decoding them. That is exact (a resumed run sees the same
samples and augmentation) at the cost of re-reading up to one pass's share of a reader's bytes
on resume, and the order depends on ``DATA.NUM_WORKERS`` (keep it when resuming).

Every sample's seed derives from ``(seed, pass, process, micro-batch, slot)``; the per-image
transform and the batch stage (MixUp/CutMix, RandAugment) are the folder format's.

Bad data (docs/reliability.md): an image that cannot be decoded is logged with its shard and key
and a running count, and replaced by the next readable image of its micro-batch (so positions
and seeds stay put); more than ``max(10, 1%)`` bad images stop training with ``ImageReadError``.
In the validation set a bad image stops the run. A shard that is missing, not a tar or truncated
(cut mid-member, or fewer samples than ``info.json`` says, or another size in bytes), a sample
without image or label, a label that is not an integer or is out of range: ``DatasetError``
naming the shard and the key.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ..data.validate import DatasetError, ImageReadError, to_rgb_uint8

__all__ = [
    "INFO_FILE",
    "ShardSpec",
    "resolve_shards",
    "decode_image",
    "iter_shard",
    "ShardedDataset",
    "ShardBatchSampler",
    "build_shard_dataset",
    "build_shard_train_loader",
    "build_shard_test_loader",
    "write_shards",
]

INFO_FILE = "info.json"
# Image extensions make_shards copies as they are (others: re-encoded as PNG).
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ shard lists
class ShardSpec:
    """The shards of a split and what ``info.json`` says about them.

    Attributes:
        paths (list[str]): shard files, in order.
        counts (list[int] | None): samples per shard (from ``info.json``), when known.
        sizes (list[int] | None): bytes per shard (from ``info.json``), when known.
        classes (list[str] | None): class names, when known.
        num_classes (int | None): number of classes, when known.
        info_path (str | None): the ``info.json`` read.
    """

    def __init__(self, paths: list[str], counts: list[int] | None = None,
                 sizes: list[int] | None = None, classes: list[str] | None = None,
                 num_classes: int | None = None, info_path: str | None = None):
        self.paths, self.counts, self.sizes = paths, counts, sizes
        self.classes, self.num_classes, self.info_path = classes, num_classes, info_path

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def _read_info(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        shards = info["shards"]
        for entry in shards:
            entry["file"], int(entry["num_samples"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a shard info file written by make_shards.py ({e!r})") \
            from None
    return info


def resolve_shards(spec: str, root: str = "") -> ShardSpec:
    """The shard files of ``spec`` (see the module docstring) and their ``info.json``.

    Args:
        spec (str): brace patterns joined by ``::``, or a folder.
        root (str): folder the relative parts are under.

    Raises:
        DatasetError: an empty spec, a pattern that names a missing file (named), a folder
            without shards, or a shard whose size differs from ``info.json``'s (truncated).
    """
    import braceexpand

    if not spec.strip():
        raise DatasetError("DATA.FORMAT 'wds': no shards given (DATA.TRAIN_SPLIT / VAL_SPLIT)")
    paths: list[str] = []
    for part in spec.split("::"):
        part = os.path.join(root, part.strip()) if root else part.strip()
        if os.path.isdir(part):
            info_path = os.path.join(part, INFO_FILE)
            if os.path.isfile(info_path):
                names = [e["file"] for e in _read_info(info_path)["shards"]]
            else:
                names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(part, "*.tar")))
            if not names:
                raise DatasetError(f"Shard folder {part!r} holds no *.tar shards")
            paths.extend(os.path.join(part, n) for n in names)
        else:
            paths.extend(braceexpand.braceexpand(part))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"Shard {missing[0]!r} does not exist ({len(missing)} of {len(paths)} shards of "
            f"{spec!r} missing; DATA.ROOT {root!r})"
        )
    return _with_info(paths)


def _with_info(paths: list[str]) -> ShardSpec:
    """Attach the counts of ``info.json`` beside the shards (one per folder), checking sizes."""
    infos: dict[str, dict | None] = {}
    counts, sizes = [], []
    classes = num_classes = info_path = None
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in infos:
            candidate = os.path.join(folder, INFO_FILE)
            info = _read_info(candidate) if os.path.isfile(candidate) else None
            if info is not None:
                info["by_file"] = {e["file"]: e for e in info["shards"]}
                if info_path is None:  # classes: from the first info.json
                    info_path, classes = candidate, info.get("classes")
                    num_classes = info.get("num_classes")
            infos[folder] = info
        info = infos[folder]
        entry = info["by_file"].get(os.path.basename(path)) if info is not None else None
        if entry is None:
            counts = sizes = None
            continue
        if counts is not None:
            counts.append(int(entry["num_samples"]))
            sizes.append(int(entry.get("bytes", -1)))
        actual = os.path.getsize(path)
        if entry.get("bytes", actual) != actual:
            raise DatasetError(
                f"Shard {path!r} has {actual} bytes, {os.path.join(folder, INFO_FILE)} says "
                f"{entry['bytes']}: truncated or replaced; write it again (tools/make_shards.py)"
            )
    return ShardSpec(paths, counts, sizes, classes, num_classes, info_path)


# ---------------------------------------------------------------------------------- reading
def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image bytes to 8-bit RGB (``to_rgb_uint8``), fully.

    Raises:
        ImageReadError: the bytes are not an image PIL can decode; ``name`` is in the message.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb_uint8(img)
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"Image {name} is not an image PIL can read", name) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"Image {name} cannot be decoded ({e})", name) from None


def iter_shard(path: str, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard in tar order: ``{"__key__", "__shard__", ext: bytes, ...}``
    (webdataset's grouping of consecutive members by key).

    Args:
        path (str): the shard.
        expected (int | None): samples ``info.json`` says it holds (checked at its end).

    Raises:
        DatasetError: the shard cannot be opened, is not a tar, or is truncated (named, with
            the last key read).
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    last, count = None, 0
    try:
        with open(path, "rb") as stream:
            members = tar_file_expander([{"url": path, "stream": stream}])
            for sample in group_by_keys(members):
                sample.pop("__url__", None)
                sample["__shard__"] = path
                last = sample["__key__"]
                count += 1
                yield sample
    except (OSError, tarfile.TarError, EOFError) as e:
        after = f" after key {last!r}" if last is not None else ""
        raise DatasetError(f"Shard {path!r} is not a readable tar (truncated?){after}: "
                           f"{e.args[0] if e.args else e}") from None
    except ValueError as e:  # webdataset: a file name repeated within a sample
        raise DatasetError(f"Shard {path!r}: {e.args[0] if e.args else e}") from None
    if expected is not None and count != expected:
        raise DatasetError(
            f"Shard {path!r} ends after {count} samples (last key {last!r}), but its "
            f"{INFO_FILE} says {expected}: truncated; write it again (tools/make_shards.py)"
        )


def _mix(*values: int) -> int:
    """A 62-bit hash of integers (SplitMix64 steps): per-sample and per-reader seeds."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for v in values:
        x = (x ^ (int(v) & mask)) * 0xBF58476D1CE4E5B9 & mask
        x = (x ^ (x >> 30)) * 0x94D049BB133111EB & mask
        x ^= x >> 31
    return x & ((1 << 62) - 1)


def pass_shard_order(num_shards: int, seed: int, data_pass: int) -> list[int]:
    """The permutation of the shards for one pass, from ``(seed, pass)``."""
    g = torch.Generator().manual_seed(_mix(seed, data_pass, 1))
    return torch.randperm(num_shards, generator=g).tolist()


class _Reader:
    """One reader's sample stream of a pass (raw bytes, not decoded) and its position."""

    def __init__(self, spec: ShardSpec, seed: int, data_pass: int, reader: int, readers: int,
                 buffer: int):
        order = pass_shard_order(len(spec.paths), seed, data_pass)
        self.shards = order[reader::readers]
        self.spec, self.buffer = spec, buffer
        self.rng = random.Random(_mix(seed, data_pass, reader, 2))
        self.key = (seed, data_pass)
        self.position = 0
        self._stream = self._all()

    def _all(self) -> Iterator[dict[str, Any]]:
        cycle = 0
        while True:
            if cycle == 1:
                logger.warning("A shard reader ran out of samples within a pass and starts over "
                               "on its %d shard(s) (unequal shard sizes)", len(self.shards))
            count = 0
            for sample in self._shuffled(self._one_cycle()):
                count += 1
                yield sample
            if count == 0:
                names = [self.spec.paths[s] for s in self.shards]
                raise DatasetError(f"Shards {names} hold no samples")
            cycle += 1

    def _one_cycle(self) -> Iterator[dict[str, Any]]:
        for s in self.shards:
            count = self.spec.counts[s] if self.spec.counts is not None else None
            yield from iter_shard(self.spec.paths[s], count)

    def _shuffled(self, raw: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        pool: list[dict[str, Any]] = []
        for sample in raw:
            if len(pool) < self.buffer:
                pool.append(sample)
                continue
            if not pool:  # no buffer: tar order
                yield sample
                continue
            k = self.rng.randrange(len(pool))
            pool[k], sample = sample, pool[k]
            yield sample
        self.rng.shuffle(pool)
        yield from pool

    def take(self, n: int) -> list[dict[str, Any]]:
        out = [next(self._stream) for _ in range(n)]
        self.position += n
        return out


class ShardedDataset(Dataset):
    """The samples of a set of shards. ``len()`` is the epoch size (``DATA.WDS.NUM_SAMPLES``
    or ``info.json``'s count).

    Training reads micro-batches through ``__getitems__`` with descriptors from
    ``ShardBatchSampler``; evaluation iterates ``ShardEvalStream``.

    Args:
        spec (ShardSpec): the shards.
        num_samples (int): the epoch size.
        transform (callable): the per-image transform (PIL image [, seed] -> tensor).
        num_classes (int): labels must lie in ``[0, num_classes)``.
        image_keys (sequence[str]): image extensions tried in order.
        label_key (str): the label's extension.
        shuffle_buffer (int): samples per reader's shuffle buffer (training).
        skip_unreadable (bool): replace undecodable images (training) instead of raising.
    """

    def __init__(self, spec: ShardSpec, num_samples: int, transform: Callable, num_classes: int,
                 image_keys: Sequence[str] = SHARD_IMAGE_EXTENSIONS, label_key: str = "cls",
                 shuffle_buffer: int = 1000, skip_unreadable: bool = False):
        self.spec = spec
        self.num_samples = int(num_samples)
        self.transform = transform
        self.num_classes = int(num_classes)
        self.image_keys = [k.lower().lstrip(".") for k in image_keys]
        self.label_key = label_key.lower().lstrip(".")
        self.shuffle_buffer = int(shuffle_buffer)
        self.skip_unreadable = skip_unreadable
        self.classes = list(spec.classes) if spec.classes is not None else None
        self.max_bad_images = max(10, int(0.01 * self.num_samples))
        self.bad_count = 0  # per loader worker
        # Set by the loader: this process, the number of processes and readers per process.
        self.rank, self.world_size, self.readers = 0, 1, 1
        self._open: dict[int, _Reader] = {}

    def __len__(self) -> int:
        return self.num_samples

    # -- one sample
    def label_of(self, sample: dict[str, Any]) -> int:
        """The sample's label, checked.

        Raises:
            DatasetError: no label, not an integer, or out of range (shard and key named).
        """
        where = f"shard {sample['__shard__']!r}, key {sample['__key__']!r}"
        raw = sample.get(self.label_key)
        if raw is None:
            raise DatasetError(f"Sample without label ({where}): no .{self.label_key} member "
                               f"(members: {_members(sample)}; DATA.WDS.LABEL_KEY)")
        try:
            label = int(bytes(raw).decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise DatasetError(f"Label {bytes(raw)[:20]!r} of {where} is not an integer") \
                from None
        if not 0 <= label < self.num_classes:
            raise DatasetError(f"Label {label} of {where} is out of range: MODEL.NUM_CLASSES "
                               f"is {self.num_classes}")
        return label

    def image_of(self, sample: dict[str, Any]) -> Image.Image:
        """The sample's image, decoded to RGB.

        Raises:
            DatasetError: no image member (shard and key named).
            ImageReadError: undecodable (shard and key named).
        """
        for key in self.image_keys:
            if key in sample:
                name = f"{sample['__key__']}.{key} of shard {sample['__shard__']!r}"
                return decode_image(sample[key], name)
        raise DatasetError(
            f"Sample without image: shard {sample['__shard__']!r}, key {sample['__key__']!r} "
            f"has members {_members(sample)}, none of DATA.WDS.IMAGE_KEYS {self.image_keys}"
        )

    def _transformed(self, image: Image.Image, seed: int | None):
        if seed is None:
            return self.transform(image)
        if getattr(self.transform, "takes_seed", False):
            return self.transform(image, seed)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(image)

    # -- training micro-batches
    def _reader(self, seed: int, data_pass: int, micro: int, size: int) -> _Reader:
        v = micro % self.readers
        start = (micro // self.readers) * size
        reader = self._open.get(v)
        if reader is None or reader.key != (seed, data_pass) or reader.position != start:
            reader = _Reader(self.spec, seed, data_pass, self.rank * self.readers + v,
                             self.world_size * self.readers, self.shuffle_buffer)
            reader.take(start)  # the skipped samples are read, not decoded
            self._open = {v: reader}
        return reader

    def __getitems__(self, descriptors: list[tuple[int, int, int, int]]) -> list[tuple]:
        """The samples ``(image, label, seed)`` of one micro-batch, from the descriptors
        ``(seed, pass, micro-batch, slot)`` of its slots (``ShardBatchSampler``)."""
        seed, data_pass, micro, _ = descriptors[0]
        raw = self._reader(seed, data_pass, micro, len(descriptors)).take(len(descriptors))
        labels = [self.label_of(s) for s in raw]
        images: list[Image.Image | None] = []
        for sample in raw:
            try:
                images.append(self.image_of(sample))
            except ImageReadError as e:
                if not self.skip_unreadable:
                    raise
                images.append(None)
                self._skip(e)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise ImageReadError(f"No image of a micro-batch from shard {raw[0]['__shard__']!r} "
                                 "can be decoded", raw[0]["__shard__"])
        out = []
        for i, (_, _, _, slot) in enumerate(descriptors):
            # An unreadable image: the next readable one of the micro-batch (cyclically).
            j = next((k for k in good if k >= i), good[0])
            sample_seed = _mix(seed, data_pass, self.rank, micro, slot)
            out.append((self._transformed(images[j], sample_seed), labels[j], sample_seed))
        return out

    def _skip(self, error: ImageReadError) -> None:
        self.bad_count += 1
        logger.warning("Skipping image %d (replaced by the next one of its micro-batch): %s",
                       self.bad_count, error)
        if self.bad_count > self.max_bad_images:
            raise ImageReadError(
                f"{self.bad_count} images of the shards could not be decoded (limit "
                f"{self.max_bad_images}; the last: {error}): the dataset looks broken, stopping",
                error.path,
            )

    def __getitem__(self, item):
        raise TypeError("ShardedDataset is read in micro-batches (ShardBatchSampler) or "
                        "streamed (build_shard_test_loader), not indexed")


def _members(sample: dict[str, Any]) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


class ShardBatchSampler(Sampler):
    """Micro-batch descriptors of this process for ``ShardedDataset.__getitems__``: one pass at a
    time, resumable at any optimizer step (``set_epoch(pass, step)``), like
    ``data.EpochBatchSampler``.

    Args:
        dataset_size (int): the epoch size.
        global_batch (int): training examples per optimizer step over all processes.
        world_size (int): number of processes.
        seed (int): the run's seed.
        sources_per_example (int): source images per training example (2 with mixing).
        accum_steps (int): micro-batches per optimizer step.
    """

    def __init__(self, dataset_size: int, global_batch: int, world_size: int, seed: int,
                 sources_per_example: int = 1, accum_steps: int = 1):
        from .data import EpochBatchSampler

        # The same step arithmetic and checks as the folder format's sampler.
        ref = EpochBatchSampler(dataset_size, global_batch, 0, world_size, seed,
                                sources_per_example, accum_steps)
        self.steps_per_epoch, self.micro_sources = ref.steps_per_epoch, ref.micro_sources
        self.accum_steps, self.seed = accum_steps, seed
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the pass and the optimizer step within it to start from (for resuming)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        # The seed travels with each request: --resume may change it after workers started.
        for micro in range(self.start_step * self.accum_steps,
                           self.steps_per_epoch * self.accum_steps):
            yield [(self.seed, self.epoch, micro, slot) for slot in range(self.micro_sources)]


def build_shard_dataset(cfg, split: str, transform: Callable) -> ShardedDataset:
    """The train or val ``ShardedDataset`` of ``cfg.DATA`` (``DATA.FORMAT 'wds'``).

    Raises:
        DatasetError: missing shards, no epoch size, a shard of the wrong size, or more classes
            in ``info.json`` than ``MODEL.NUM_CLASSES`` (named).
    """
    data, wds = cfg.DATA, cfg.DATA.WDS
    name = data.TRAIN_SPLIT if split == "train" else data.VAL_SPLIT
    spec = resolve_shards(name, data.ROOT)
    num_samples = int(wds.NUM_SAMPLES) if split == "train" and wds.NUM_SAMPLES > 0 \
        else spec.num_samples
    if num_samples is None:
        if split != "train":
            num_samples = 0  # evaluation streams the shards; the size is not needed
        else:
            raise DatasetError(
                f"DATA.FORMAT 'wds': the epoch size of {name!r} is unknown: no {INFO_FILE} beside "
                "its shards lists them; set DATA.WDS.NUM_SAMPLES"
            )
    if spec.num_classes is not None and spec.num_classes > cfg.MODEL.NUM_CLASSES:
        raise DatasetError(
            f"The {split} shards {name!r} have {spec.num_classes} classes ({spec.info_path}), "
            f"but MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}"
        )
    return ShardedDataset(spec, num_samples, transform, cfg.MODEL.NUM_CLASSES,
                          image_keys=wds.IMAGE_KEYS, label_key=wds.LABEL_KEY,
                          shuffle_buffer=wds.SHUFFLE_BUFFER, skip_unreadable=split == "train")


def build_shard_train_loader(cfg, dataset: ShardedDataset, rank: int, world_size: int, seed: int,
                             collate_fn: Callable, loader_kwargs: dict,
                             ) -> tuple[DataLoader, ShardBatchSampler]:
    """The train loader of a ``ShardedDataset`` and its sampler (``set_epoch`` before a pass).

    Raises:
        DatasetError: fewer shards than readers (processes x loader workers).
    """
    readers = max(1, int(loader_kwargs.get("num_workers", 0)))
    if len(dataset.spec.paths) < world_size * readers:
        raise DatasetError(
            f"{len(dataset.spec.paths)} shard(s) ({cfg.DATA.TRAIN_SPLIT!r}) for {world_size} "
            f"process(es) x {readers} loader worker(s): every worker needs a shard of its own; "
            "write smaller shards (tools/make_shards.py --shard-size) or set DATA.NUM_WORKERS"
        )
    if dataset.spec.counts is not None:
        share = min(sum(dataset.spec.counts[i::world_size * readers])
                    for i in range(world_size * readers))
        if share * world_size * readers < 0.9 * len(dataset):
            logger.warning("Shard sizes are uneven: the smallest reader share is %d samples; "
                           "short readers repeat samples within a pass", share)
    dataset.rank, dataset.world_size, dataset.readers = rank, world_size, readers
    sources = getattr(collate_fn, "sources_per_example", 1)
    sampler = ShardBatchSampler(len(dataset), cfg.SOLVER.IMS_PER_BATCH, world_size, seed,
                                sources_per_example=sources, accum_steps=cfg.SOLVER.ACCUM_STEPS)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                        generator=torch.Generator(), **loader_kwargs)
    return loader, sampler


class ShardEvalStream(IterableDataset):
    """Evaluation: ``(image, label)`` of every sample of this process's shards
    (``rank::world_size``), split further across loader workers; each sample once overall."""

    def __init__(self, dataset: ShardedDataset, rank: int, world_size: int):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        spec = self.dataset.spec
        for s in range(len(spec.paths))[self.rank::self.world_size][worker::workers]:
            count = spec.counts[s] if spec.counts is not None else None
            for sample in iter_shard(spec.paths[s], count):
                label = self.dataset.label_of(sample)
                yield self.dataset.transform(self.dataset.image_of(sample)), label


def build_shard_test_loader(cfg, dataset: ShardedDataset, rank: int, world_size: int,
                            loader_kwargs: dict) -> DataLoader:
    """Eval loader over this process's shards (no padding, no duplicates)."""
    return DataLoader(ShardEvalStream(dataset, rank, world_size),
                      batch_size=cfg.TEST.IMS_PER_BATCH, **loader_kwargs)


# ---------------------------------------------------------------------------------- writing
def write_shards(src: str, out: str, shard_size: int = 1000, prefix: str | None = None,
                 root: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Write WebDataset shards and ``info.json`` from an ImageNet-layout folder or a file list.

    Samples are shuffled once (from ``seed``) so that every shard mixes the classes; images are
    copied byte for byte (``jpg``/``jpeg``/``png``/``webp``; other formats re-encoded as PNG),
    labels written as ``.cls``. Each shard is written under a temporary name and renamed when
    complete, and ``info.json`` comes last: a folder without it is unfinished.

    Args:
        src (str): a folder of class folders (``DATA.FORMAT 'folder'``'s split folder) or a file
            list (``'filelist'``: ``relative/path label`` lines).
        out (str): output folder (created; must not hold shards already).
        shard_size (int): samples per shard.
        prefix (str | None): shard name prefix (default: ``src``'s base name).
        root (str | None): folder a file list's paths are relative to (default: the list's).
        seed (int): the shuffle's seed.
        progress (bool): show a progress bar.

    Returns:
        dict: the ``info.json`` contents.

    Raises:
        DatasetError / FileNotFoundError: a bad source (named), or ``out`` already holds shards.
        ImageReadError: a source image that must be re-encoded cannot be read.
    """
    from tqdm import tqdm
    from webdataset import TarWriter

    from .data import read_file_list, scan_image_folder

    if shard_size < 1:
        raise DatasetError(f"--shard-size must be >= 1, got {shard_size}")
    if os.path.isdir(src):
        rel, labels, classes = scan_image_folder(src)
        base = src
    else:
        rel, labels = read_file_list(src)
        classes = None
        base = root if root is not None else os.path.dirname(os.path.abspath(src))
    num_classes = len(classes) if classes is not None else max(labels) + 1
    os.makedirs(out, exist_ok=True)
    if glob.glob(os.path.join(out, "*.tar")) or os.path.exists(os.path.join(out, INFO_FILE)):
        raise DatasetError(f"{out!r} already holds shards or an {INFO_FILE}; remove them or "
                           "choose another folder")
    prefix = prefix or os.path.splitext(os.path.basename(os.path.normpath(src)))[0]
    order = np.random.default_rng(seed).permutation(len(rel))
    num_shards = (len(rel) + shard_size - 1) // shard_size
    digits = max(6, len(str(num_shards - 1)))
    entries = []
    bar = tqdm(total=len(rel), desc="make_shards", unit="img", disable=not progress)
    for s in range(num_shards):
        name = f"{prefix}-{s:0{digits}d}.tar"
        path = os.path.join(out, name)
        tmp = path + ".part"
        with open(tmp, "wb") as f:
            writer = TarWriter(f, encoder=False, mtime=0.0)
            chunk = order[s * shard_size:(s + 1) * shard_size]
            for i in chunk:
                image_path = os.path.join(base, rel[i])
                writer.write({"__key__": f"{int(i):09d}", **_image_member(image_path),
                              "cls": str(int(labels[i])).encode("ascii")})
                bar.update(1)
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        entries.append({"file": name, "num_samples": len(chunk), "bytes": os.path.getsize(path)})
    bar.close()
    info = {"num_samples": len(rel), "num_classes": num_classes, "classes": classes,
            "source": os.path.abspath(src), "shards": entries}
    tmp = os.path.join(out, INFO_FILE + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(out, INFO_FILE))
    return info


def _image_member(path: str) -> dict[str, bytes]:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in SHARD_IMAGE_EXTENSIONS:
        try:
            with open(path, "rb") as f:
                return {ext: f.read()}
        except FileNotFoundError:
            raise DatasetError(f"Image {path!r} does not exist") from None
    from ..data.validate import read_image_rgb

    buffer = io.BytesIO()
    read_image_rgb(path).save(buffer, format="PNG")
    return {"png": buffer.getvalue()}
