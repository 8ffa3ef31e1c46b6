"""Pretraining trainer pieces: configs vs. the recipe table, config checks, schedule, EMA, the
sampler, dataset errors (fast, no training). Checkpoints: test_checkpoint.py. RandAugment:
test_randaugment.py; mixing: test_mixing.py; the input pipeline: test_pretrain_transforms.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS
from PIL import Image

from nfdet.classification import (
    EpochBatchSampler,
    ModelEMA,
    build_dataset,
    build_train_transform,
    get_pretrain_cfg,
    lr_factor,
    read_file_list,
    resolve_config_file,
    scaled_lr,
    write_file_list,
)
from nfdet.classification.config import load_pretrain_cfg
from nfdet.config import ConfigError
from nfdet.modeling import canonical_name

CONFIG_DIR = CONFIGS / "pretrain"

# docs/reference.md (the variant table): train res, test res, RandAugment (layers, magnitude),
# dropout
RECIPE = {
    "F0": (192, 256, 4, 5, 0.2),
    "F1": (224, 320, 4, 10, 0.3),
    "F2": (256, 352, 4, 10, 0.4),
    "F3": (320, 416, 4, 15, 0.4),
    "F4": (384, 512, 4, 15, 0.5),
    "F5": (416, 544, 4, 15, 0.5),
    "F6": (448, 576, 4, 15, 0.5),
    "F7": (480, 608, 4, 15, 0.5),
}


def _load(path) -> object:
    cfg = get_pretrain_cfg()
    cfg.merge_from_file(str(path))
    return cfg


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_pretrain_config_loads(path):
    cfg = _load(path)
    canonical_name(cfg.MODEL.NFNET.VARIANT)  # raises on an unknown variant
    assert cfg.SOLVER.IMS_PER_BATCH > 0 and cfg.INPUT.TRAIN_SIZE > 0 and cfg.INPUT.TEST_SIZE > 0


@pytest.mark.parametrize("variant", sorted(RECIPE))
def test_variant_config_matches_recipe_table(variant):
    cfg = _load(CONFIG_DIR / f"nfnet_{variant.lower()}_imagenet.yaml")
    train, test, ops, magnitude, dropout = RECIPE[variant]
    assert canonical_name(cfg.MODEL.NFNET.VARIANT) == variant
    assert (cfg.INPUT.TRAIN_SIZE, cfg.INPUT.TEST_SIZE) == (train, test)
    assert cfg.INPUT.RANDAUGMENT.ENABLED
    assert (cfg.INPUT.RANDAUGMENT.NUM_OPS, cfg.INPUT.RANDAUGMENT.MAGNITUDE) == (ops, magnitude)
    assert cfg.MODEL.DROPOUT == pytest.approx(dropout)
    # The shared DeepMind recipe: its eval transform (resize_crop_32), its RandAugment on the
    # mixed images.
    assert cfg.INPUT.TEST_RESIZE_PAD == 32 and cfg.INPUT.INTERPOLATION == "bicubic"
    assert cfg.INPUT.TEST_RESIZE == "squash"
    assert cfg.INPUT.RANDAUGMENT.IMPL == "deepmind" and not cfg.INPUT.AUGMENT_BEFORE_MIX
    assert cfg.SOLVER.ACCUM_STEPS == 1 and cfg.SOLVER.IMS_PER_BATCH == 4096
    assert scaled_lr(cfg) == pytest.approx(1.6)  # 0.1 x 4096 / 256
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.MOMENTUM, s.NESTEROV, s.WEIGHT_DECAY) == ("SGD", 0.9, True, 2e-5)
    assert (s.EPOCHS, s.WARMUP_EPOCHS, s.AGC.CLIPPING, s.EMA.DECAY) == (360, 5, 0.01, 0.99999)
    assert "head.fc.weight" in s.AGC.EXCLUDE
    assert cfg.MODEL.NFNET.DROP_PATH_RATE == 0.25 and cfg.INPUT.LABEL_SMOOTHING == 0.1
    assert (cfg.INPUT.MIXUP_ALPHA, cfg.INPUT.CUTMIX_ALPHA) == (0.2, 1.0)


def test_config_resolution_and_bad_key():
    assert resolve_config_file("nfnet_f0_imagenet.yaml").endswith("pretrain/nfnet_f0_imagenet.yaml")
    assert resolve_config_file("nfnet_f3_imagenet").endswith("nfnet_f3_imagenet.yaml")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        resolve_config_file("nope.yaml")
    cfg = get_pretrain_cfg()
    with pytest.raises(AssertionError, match="SOLVER.NOT_A_KEY"):  # yacs names the key
        cfg.merge_from_list(["SOLVER.NOT_A_KEY", 1])


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == 0.0
    assert lr_factor(5, 100, 10) == pytest.approx(0.5)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    values = [lr_factor(s, 100, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_ema_warmup_decay_and_average():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = ModelEMA(model, decay=0.99)
    assert ema.current_decay() == pytest.approx(1 / 10)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # d = 0.1: ema = 0.1 * 0 + 0.9 * 1
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.9))
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.99


@pytest.mark.parametrize("key, value, message", [
    ("INPUT.TEST_RESIZE", "crop", "INPUT.TEST_RESIZE must be one of 'squash', 'shorter_side'"),
    ("INPUT.RANDAUGMENT.IMPL", "timm", "INPUT.RANDAUGMENT.IMPL must be one of 'deepmind'"),
    ("INPUT.RANDAUGMENT.CONTRAST_GRAY", "median", "INPUT.RANDAUGMENT.CONTRAST_GRAY must be"),
    ("INPUT.RANDAUGMENT.MAGNITUDE", "-3", "INPUT.RANDAUGMENT.MAGNITUDE must be >= 0"),
    ("INPUT.MIXUP_ALPHA", "-0.2", "INPUT.MIXUP_ALPHA must be >= 0"),
    ("SOLVER.ACCUM_STEPS", "0", "SOLVER.ACCUM_STEPS must be an integer >= 1"),
    ("SOLVER.ACCUM_STEPS", "3", "SOLVER.ACCUM_STEPS must be a divisor of SOLVER.IMS_PER_BATCH"),
    ("INPUT.RANDOM_RESIZED_CROP.SCALE", "(0.5, 1.5)", "INPUT.RANDOM_RESIZED_CROP.SCALE must be"),
    ("INPUT.INTERPOLATION", "lanczos", "INPUT.INTERPOLATION must be one of"),
])
def test_bad_pipeline_values_are_one_line_errors_naming_the_key(key, value, message):
    with pytest.raises(ConfigError) as info:
        load_pretrain_cfg("nfnet_f0_imagenet", [key, value])
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text, text


def test_sampler_shards_and_resumes():
    full = [EpochBatchSampler(50, 8, r, 2, seed=3) for r in range(2)]
    for s in full:
        s.set_epoch(1)
    batches = [list(s) for s in full]
    assert len(batches[0]) == 50 // 8 and all(len(b) == 4 for b in batches[0])
    seen = [i for r in range(2) for b in batches[r] for i, _ in b]
    assert len(seen) == len(set(seen)) == 48
    resumed = EpochBatchSampler(50, 8, 1, 2, seed=3)
    resumed.set_epoch(1, start_step=4)
    assert list(resumed) == batches[1][4:]
    other = EpochBatchSampler(50, 8, 0, 2, seed=3)
    other.set_epoch(2)
    assert list(other) != batches[0]
    with pytest.raises(ValueError, match="divisible"):
        EpochBatchSampler(50, 9, 0, 2, seed=0)


def test_sampler_two_sources_per_example_and_micro_batches():
    """With mixing a step reads 2 x IMS_PER_BATCH source images, split into ACCUM_STEPS
    micro-batches per process; the micro-batches of all processes are the plain step's sources,
    in order, and a resume at a step starts with its first micro-batch."""
    plain = EpochBatchSampler(100, 8, 0, 1, seed=5, sources_per_example=2)
    plain.set_epoch(0)
    steps = list(plain)
    assert plain.steps_per_epoch == 100 // 16 and [len(b) for b in steps] == [16] * 6
    split = [EpochBatchSampler(100, 8, r, 2, seed=5, sources_per_example=2, accum_steps=2)
             for r in range(2)]
    for s in split:
        s.set_epoch(0)
    micro = [list(s) for s in split]
    assert [len(m) for m in micro] == [12, 12] and all(len(b) == 4 for m in micro for b in m)
    for step in range(6):
        # Micro-batch m of rank r is slice m * 2 + r of the step's 16 sources.
        pieces = [micro[r][2 * step + m] for m in range(2) for r in range(2)]
        assert [x for piece in pieces for x in piece] == steps[step]
    resumed = EpochBatchSampler(100, 8, 1, 2, seed=5, sources_per_example=2, accum_steps=2)
    resumed.set_epoch(0, start_step=4)
    assert len(resumed) == 4 and list(resumed) == micro[1][8:]
    with pytest.raises(ValueError, match="training set: a step reads 64 x 2 source images"):
        EpochBatchSampler(100, 64, 0, 1, seed=0, sources_per_example=2)
    with pytest.raises(ValueError, match="ACCUM_STEPS"):
        EpochBatchSampler(100, 8, 0, 2, seed=0, accum_steps=3)


def _write_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 16), (i * 40 % 256, 0, 0)).save(folder / f"{i}.png")


def test_dataset_errors_and_file_list(tmp_path):
    cfg = get_pretrain_cfg()
    cfg.DATA.ROOT = str(tmp_path / "data")
    cfg.MODEL.NUM_CLASSES = 2
    cfg.INPUT.TRAIN_SIZE = 16
    cfg.INPUT.RANDAUGMENT.ENABLED = False
    transform = build_train_transform(cfg)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data" / "train")):
        build_dataset(cfg, "train", transform)
    _write_images(tmp_path / "data" / "train" / "a", 3)
    (tmp_path / "data" / "train" / "b").mkdir()
    with pytest.raises(ValueError, match="b' holds no images"):
        build_dataset(cfg, "train", transform)
    _write_images(tmp_path / "data" / "train" / "b", 2)
    ds = build_dataset(cfg, "train", transform)
    assert len(ds) == 5 and ds.classes == ["a", "b"] and list(ds.labels) == [0, 0, 0, 1, 1]
    img, label = ds[(3, 123)]
    # The per-image stage gives float images (the bicubic resize is not clamped).
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and label == 1
    assert torch.equal(ds[(3, 123)][0], img)  # per-sample seed -> same augmentation

    assert write_file_list(str(tmp_path / "data" / "train"), str(tmp_path / "data" / "t.txt")) == 5
    paths, labels = read_file_list(str(tmp_path / "data" / "t.txt"))
    assert paths[0] == "train/a/0.png" and labels == [0, 0, 0, 1, 1]
    cfg.DATA.FORMAT = "filelist"
    cfg.DATA.TRAIN_SPLIT = "t.txt"
    assert len(build_dataset(cfg, "train", transform)) == 5
    cfg.MODEL.NUM_CLASSES = 1
    with pytest.raises(ValueError, match="MODEL.NUM_CLASSES is 1"):
        build_dataset(cfg, "train", transform)
    (tmp_path / "data" / "bad.txt").write_text("train/a/0.png zero\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_file_list(str(tmp_path / "data" / "bad.txt"))
