"""Helpers shared by the test files: repository paths, the quick detection config, nano models,
classification checkpoints, image folders, the runner of ``tools/`` scripts and the pieces of the
2-process gloo tests.

Imported as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``). detectron2 is
imported inside the functions that need it, so that model-only test files do not pay for it.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TOOLS = REPO / "tools"
# The smallest detector: as the tools' --config accepts it, and as a file.
QUICK_NAME = "quick/nfnet_nano_mask_rcnn_instant.yaml"
QUICK = CONFIGS / QUICK_NAME
# Every normalization layer type of torch: an NF network must contain none of them.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def nano(num_classes: int = 5, seed: int | None = 0, **overrides) -> nn.Module:
    """The "nano" NFNet classifier, built after ``torch.manual_seed(seed)`` (``None``: no seeding).

    Args:
        num_classes (int): classes of the head.
        seed (int | None): seed of the initialisation.
        overrides: architecture overrides of ``build_nfnet`` (``widths``, ``depths``, ...).
    """
    from nfdet.modeling import build_nfnet

    if seed is not None:
        torch.manual_seed(seed)
    return build_nfnet("nano", num_classes=num_classes, **overrides)


def set_skip_gains(model: nn.Module, low: float = 0.2, high: float = 1.0) -> None:
    """Draw every block's skip gain uniformly from [low, high) (at init they are 0 and the
    residual branches contribute nothing)."""
    from nfdet.modeling import NFBlock

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NFBlock):
                m.skip_gain.uniform_(low, high)


def perturb_block_scalars(block: nn.Module) -> nn.Module:
    """Move a block's scalars away from their init (skip gain 0.7, conv gains in [0.5, 1.5),
    biases ~ N(0, 0.1)), so that a test sees each of them act; returns ``block``."""
    from nfdet.modeling import ScaledStdConv2d

    with torch.no_grad():
        block.skip_gain.fill_(0.7)
        for m in block.modules():
            if isinstance(m, ScaledStdConv2d):
                m.gain.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return block


def gained_nano(seed: int = 0) -> nn.Module:
    """``nano(5, seed)`` with skip gains in [0.2, 1), in eval mode."""
    model = nano(num_classes=5, seed=seed)
    set_skip_gains(model)
    return model.eval()


def quick_cfg(*opts):
    """The quick detection config (``QUICK``) merged as detectron2 does (no nfdet checks), with
    ``KEY VALUE`` overrides."""
    from nfdet.detection import get_nfdet_cfg

    cfg = get_nfdet_cfg()
    cfg.merge_from_file(str(QUICK))
    cfg.merge_from_list(list(opts))
    return cfg


def quick_model(*opts) -> nn.Module:
    """Mask R-CNN nano built from ``quick_cfg(*opts)``."""
    from detectron2.modeling import build_model

    return build_model(quick_cfg(*opts))


def checked_quick_cfg(*opts):
    """The quick detection config through nfdet's checked merge (``nfdet.config.merge_config``),
    as the tools load it, with ``KEY VALUE`` overrides."""
    from nfdet.config import merge_config, resolve_config_file
    from nfdet.detection import get_nfdet_cfg

    return merge_config(get_nfdet_cfg(), resolve_config_file(QUICK_NAME), list(opts))


def write_classifier_checkpoint(path: Path, model: nn.Module, **meta) -> Path:
    """Save ``model`` as an nfdet classification checkpoint (``{"model", "meta"}``) to ``path``."""
    from nfdet.checkpoint import save_checkpoint

    save_checkpoint({"model": model.state_dict(), "meta": dict(meta)}, path)
    return path


def write_image_folder(root: Path, classes: Sequence[str], per_class: int, size: int,
                       splits: Sequence[str] = ("train",), seed: int = 0) -> Path:
    """An ImageNet-style folder ``root/<split>/<class>/<i>.png`` of drawn shapes on textured
    backgrounds (``nfdet.data.synthetic``): class ``k`` draws ``CATEGORIES[k % 4]``.

    Args:
        root (Path): folder to write (created).
        classes (Sequence[str]): class folder names.
        per_class (int): images per class and split.
        size (int): side of the square images.
        splits (Sequence[str]): split folders to write.
        seed (int): seed; each image has its own stream ``[seed, split, class, i]``.

    Returns:
        Path: ``root``.
    """
    from nfdet.data.synthetic import CATEGORIES, SyntheticDataParams, render_classification_image

    params = SyntheticDataParams()
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, s, c, i])
                image = render_classification_image(rng, c % len(CATEGORIES), size, params)
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


FLAT_SHAPES = ("circle", "square", "triangle", "cross")


def write_flat_shapes(root: Path, per_split: dict[str, int], size: int,
                      classes: Sequence[str] = FLAT_SHAPES) -> Path:
    """An ImageNet-style folder ``root/<split>/<shape>/<i>.png``: one bright shape on a flat dark
    background per image, which the nano variant learns in a few dozen steps (the textured images
    of ``write_image_folder`` take far longer). One seeded stream for the whole folder.

    Args:
        root (Path): folder to write (created).
        per_split (dict[str, int]): images per class of each split, e.g. ``{"train": 40}``.
        size (int): side of the square images.
        classes (Sequence[str]): shapes, a subset of ``FLAT_SHAPES``.

    Returns:
        Path: ``root``.
    """
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 120, 3)))
                draw = ImageDraw.Draw(img)
                fg = tuple(int(v) for v in rng.integers(130, 256, 3))
                r = rng.uniform(0.25, 0.4) * size
                cx, cy = rng.uniform(r, size - r, 2)
                if c == "circle":
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
                elif c == "square":
                    draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
                elif c == "triangle":
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
                else:
                    w = r / 3
                    draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
                    draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
                img.save(root / split / c / f"{i:03d}.png")
    return root


def run_tool(script: str, *args: str, cwd: Path = REPO, timeout: float = 300,
             **env: str) -> subprocess.CompletedProcess:
    """Run ``tools/<script>`` in a fresh interpreter with one CPU thread (tiny workloads gain
    nothing from more, and oversubscribed cores make multi-threaded kernels many times slower).

    Args:
        script (str): file name under ``tools/``.
        args (str): its command line.
        cwd (Path): working directory.
        timeout (float): seconds before the run is killed (a failure, not a measurement).
        env (str): extra environment variables.

    Returns:
        CompletedProcess: with ``stdout`` and ``stderr`` as text.
    """
    return subprocess.run(
        [sys.executable, str(TOOLS / script), *map(str, args)], cwd=cwd,
        env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True, text=True,
        timeout=timeout,
    )


def write_json(data, path: Path) -> Path:
    """Write ``data`` as JSON to ``path``; returns ``path``."""
    path.write_text(json.dumps(data))
    return path


def tiny_coco_cfg(*datasets: str, **overrides):
    """``checked_quick_cfg`` for the 2-class tiny COCO set (conftest's ``tiny_coco``).

    Args:
        datasets (str): registered names, used as ``DATASETS.TRAIN`` and ``DATASETS.TEST``.
        overrides: ``KEY__SUBKEY=value`` (``__`` for ``.``), e.g. ``MODEL__MASK_ON=False``.
    """
    opts = ["MODEL.ROI_HEADS.NUM_CLASSES", "2"]
    if datasets:
        opts += ["DATASETS.TRAIN", str(tuple(datasets)), "DATASETS.TEST", str(tuple(datasets))]
    for key, value in overrides.items():
        opts += [key.replace("__", "."), str(value)]
    return checked_quick_cfg(*opts)


def truncate(path: Path) -> Path:
    """Cut ``path`` to the first half of its bytes (a torn write); returns ``path``."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def quick_pretrain_cfg(data: Path, out: Path, *opts: str):
    """A pretraining config for tiny CPU runs of nano on the folder ``data`` (train split only, no
    workers, 16 px, no progress bar or TensorBoard, checkpoints by step only), writing to ``out``
    (created), with ``KEY VALUE`` overrides."""
    from nfdet.classification import get_pretrain_cfg

    cfg = get_pretrain_cfg()
    cfg.merge_from_list([
        "MODEL.NFNET.VARIANT", "nano", "DATA.ROOT", str(data), "DATA.VAL_SPLIT", "",
        "DATA.NUM_WORKERS", "0", "INPUT.TRAIN_SIZE", "16", "SOLVER.CHECKPOINT_EVERY_EPOCH", "False",
        "LOG.PROGRESS_BAR", "False", "LOG.TENSORBOARD", "False", "OUTPUT_DIR", str(out),
        *map(str, opts),
    ])
    out.mkdir(parents=True, exist_ok=True)
    return cfg


TINY_COCO_CATEGORIES = ({"id": 1, "name": "rectangle"}, {"id": 2, "name": "circle"})


def write_tiny_coco(root: Path, num_images: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """Write a COCO instance-segmentation set of 64-128 px images with 1-3 filled rectangles or
    circles each; every mask is the drawn polygon (pycocotools-compatible).

    Returns:
        (json_path, image_dir)
    """
    from nfdet.data.validate import polygon_area

    rng = random.Random(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = rng.randint(64, 128), rng.randint(64, 128)
        img = Image.new("RGB", (width, height), tuple(rng.randint(0, 60) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 3)):
            category = rng.choice(TINY_COCO_CATEGORIES)["id"]
            size = rng.randint(16, min(width, height) // 2)
            x0, y0 = rng.randint(0, width - size - 1), rng.randint(0, height - size - 1)
            if category == 1:
                h = rng.randint(size // 2, size)
                points = [(x0, y0), (x0 + size, y0), (x0 + size, y0 + h), (x0, y0 + h)]
            else:
                r, cx, cy = size / 2, x0 + size / 2, y0 + size / 2
                angles = [2 * math.pi * k / 16 for k in range(16)]
                points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
            draw.polygon(points, fill=tuple(rng.randint(120, 255) for _ in range(3)))
            xy = [float(round(c, 2)) for p in points for c in p]
            xs, ys = xy[0::2], xy[1::2]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": [xy],
                    "area": polygon_area(xy),
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id:04d}.png"
        img.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    json_path = root / "annotations.json"
    json_path.write_text(
        json.dumps(
            {"images": images, "annotations": annotations, "categories": list(TINY_COCO_CATEGORIES)}
        )
    )
    return json_path, image_dir


# ---------------------------------------------------------------------------- 2-process gloo
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def counting_allreduce(calls: list):
    """A DDP comm hook that averages as DDP does and appends to ``calls`` per all-reduce."""
    def hook(state, bucket):
        import torch.distributed as dist

        calls.append(1)
        tensor = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

    return hook
