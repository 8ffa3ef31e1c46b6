"""Config of the NFNet pretraining trainer (``tools/pretrain_net.py``).

The defaults are DeepMind's ImageNet recipe for NFNets (docs/reference.md, "ImageNet recipe"; the
input pipeline stage by stage: docs/pretraining_pipeline.md); the per-variant values
(resolutions, dropout, RandAugment) live in ``configs/pretrain/nfnet_f*_imagenet.yaml``. Solver
keys use detectron2's names (``SOLVER.BASE_LR``, ``MOMENTUM``, ``NESTEROV``, ``WEIGHT_DECAY``,
``IMS_PER_BATCH``, ``CHECKPOINT_PERIOD``), so ``nfdet.solver.build_optimizer`` serves both
trainers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fvcore.common.config import CfgNode as CN

from ..config import ConfigError, add_nfnet_config, merge_config, resolve_config_file

__all__ = [
    "get_pretrain_cfg",
    "add_pretrain_config",
    "load_pretrain_cfg",
    "check_pretrain_config",
    "scaled_lr",
]


def add_pretrain_config(cfg: CN) -> None:
    """Add the pretraining keys to ``cfg`` (which already has ``add_nfnet_config``'s keys).

    Args:
        cfg (CfgNode): the config to extend.
    """
    _C = cfg
    _C.OUTPUT_DIR = "./output/pretrain"
    # Base seed; every random stream (sample order, per-image augmentation, MixUp/CutMix,
    # RandAugment, model init, dropout) is derived from it, so a fixed SEED makes a run
    # repeatable. < 0: a seed drawn once per run (shared by all processes), saved in the
    # checkpoints and reused by --resume.
    _C.SEED = 0
    # cuDNN deterministic algorithms (slower); CPU runs are deterministic anyway.
    _C.CUDNN_DETERMINISTIC = False

    _C.MODEL.NUM_CLASSES = 1000
    # Dropout before the classifier (per variant: F0 0.2 ... F4-F7 0.5).
    _C.MODEL.DROPOUT = 0.2
    # Stochastic depth (DeepMind's NFNet config: 0.25).
    _C.MODEL.NFNET.DROP_PATH_RATE = 0.25
    # Optional initial weights: an nfdet checkpoint ({"model": classifier state dict}) or a
    # pretraining checkpoint. A classifier of another size (another label space: fine-tuning)
    # is skipped and starts new (HEAD_INIT_STD); the log names the new keys.
    _C.MODEL.WEIGHTS = ""
    # The classifier weight starts N(0, HEAD_INIT_STD**2) (DeepMind's default 0.01); 0: zeros.
    _C.MODEL.HEAD_INIT_STD = 0.01
    # Train in torch.channels_last memory format (faster convs with AMP on recent GPUs).
    _C.MODEL.CHANNELS_LAST = False

    _C.DATA = CN()
    # "folder": ROOT/<TRAIN_SPLIT>/<class>/<image> (ImageNet layout; classes sorted by name).
    # "filelist": a text file of "relative/path label" lines (ROOT-relative paths, integer
    # labels), read once; for datasets a folder walk cannot serve quickly.
    # "wds": WebDataset tar shards (tools/make_shards.py writes them; DATA.WDS below), read
    # sequentially and split across processes and loader workers by shard.
    _C.DATA.FORMAT = "folder"
    _C.DATA.ROOT = "datasets/imagenet"
    # A folder under ROOT ("folder"), a file list path ("filelist") or the shards ("wds": brace
    # patterns such as "train-{000000..001023}.tar", several joined by "::", or a folder of
    # shards), absolute or relative to ROOT.
    _C.DATA.TRAIN_SPLIT = "train"
    _C.DATA.VAL_SPLIT = "val"
    # Data loader worker processes per training process (0: load in the main process).
    _C.DATA.NUM_WORKERS = 8
    _C.DATA.PREFETCH_FACTOR = 4
    # DATA.FORMAT "wds": a sample is the tar members <key>.<ext> sharing a key.
    _C.DATA.WDS = CN()
    # Image member extensions, tried in order.
    _C.DATA.WDS.IMAGE_KEYS = ["jpg", "jpeg", "png", "webp"]
    # The label member: an ASCII integer in [0, MODEL.NUM_CLASSES).
    _C.DATA.WDS.LABEL_KEY = "cls"
    # Training samples per epoch; 0: the count of the info.json beside the shards.
    _C.DATA.WDS.NUM_SAMPLES = 0
    # Samples (undecoded bytes) in each reader's shuffle buffer; one reader per loader worker.
    # The shard order is shuffled per pass too. 0: tar order.
    _C.DATA.WDS.SHUFFLE_BUFFER = 1000
    # RGB normalization on the 0-255 scale (ImageNet statistics x 255).
    _C.DATA.PIXEL_MEAN = [123.675, 116.28, 103.53]
    _C.DATA.PIXEL_STD = [58.395, 57.12, 57.375]

    # The input pipeline, in DeepMind's order (docs/pretraining_pipeline.md): per image,
    # Inception crop -> flip -> bicubic resize; per batch, MixUp/CutMix pairing -> RandAugment on
    # the mixed images; normalization on the device.
    _C.INPUT = CN()
    # Square train crop and eval crop (per variant: F0 192/256 ... F7 480/608).
    _C.INPUT.TRAIN_SIZE = 192
    _C.INPUT.TEST_SIZE = 256
    # Eval resize: "squash" (DeepMind's resize_crop_32): the whole image to
    # (TEST_SIZE + TEST_RESIZE_PAD)^2, aspect not kept, then the center TEST_SIZE crop;
    # "shorter_side": the shorter side to TEST_SIZE + TEST_RESIZE_PAD, then the center crop.
    _C.INPUT.TEST_RESIZE = "squash"
    _C.INPUT.TEST_RESIZE_PAD = 32
    # Resize kernel of the train and eval resizes: "bicubic", "bilinear" or "nearest".
    _C.INPUT.INTERPOLATION = "bicubic"
    # The train crop: TF's sample_distorted_bounding_box (DeepMind's Inception crop).
    _C.INPUT.RANDOM_RESIZED_CROP = CN()
    # Range of the crop's area as a share of the image.
    _C.INPUT.RANDOM_RESIZED_CROP.SCALE = (0.08, 1.0)
    # Range of the crop's aspect ratio (width / height), drawn uniformly.
    _C.INPUT.RANDOM_RESIZED_CROP.RATIO = (3.0 / 4.0, 4.0 / 3.0)
    # A crop must cover at least this share of the image (DeepMind: 0.1).
    _C.INPUT.RANDOM_RESIZED_CROP.MIN_OBJECT_COVERED = 0.1
    # Attempts before giving up (then the whole image, which the fallback replaces).
    _C.INPUT.RANDOM_RESIZED_CROP.MAX_ATTEMPTS = 10
    # When the crop comes back as the whole image: a center crop of side
    # TRAIN_SIZE * min(H, W) / (TRAIN_SIZE + FALLBACK_PAD) instead (DeepMind: 32).
    _C.INPUT.RANDOM_RESIZED_CROP.FALLBACK_PAD = 32
    # Random horizontal flip (p 0.5) of the crop.
    _C.INPUT.HFLIP = True
    _C.INPUT.RANDAUGMENT = CN()
    _C.INPUT.RANDAUGMENT.ENABLED = True
    # "deepmind": DeepMind's 16 ops and level table, each drawn op always applied (the
    # reference); "torchvision": nfdet's earlier torchvision-based RandAugment (14 ops with
    # Identity, signed enhance factors; not DeepMind's).
    _C.INPUT.RANDAUGMENT.IMPL = "deepmind"
    # DeepMind's (layers, magnitude): ops per image and the shared level m >= 0 (m / 10 of each
    # op's level-10 argument; 15 extrapolates). F0 (4, 5), F1-F2 (4, 10), F3-F7 (4, 15).
    _C.INPUT.RANDAUGMENT.NUM_OPS = 4
    _C.INPUT.RANDAUGMENT.MAGNITUDE = 5
    # Contrast's flat gray level ("deepmind" impl): "mean" (the image's mean gray, PIL's
    # definition) or "pixel_count" (DeepMind's code: H * W / 256 clipped to 255, a histogram
    # bug; docs/pretraining_pipeline.md says why nfdet does not follow it by default).
    _C.INPUT.RANDAUGMENT.CONTRAST_GRAY = "mean"
    # False (DeepMind's NFNet setting): RandAugment runs on the mixed images, in the batch
    # stage. True: on each source image before mixing (nfdet's earlier order).
    _C.INPUT.AUGMENT_BEFORE_MIX = False
    # Pairing of 2b source images into b training examples (DeepMind's): MixUp on the first
    # half of the examples (ratio ~ Beta(MIXUP_ALPHA, MIXUP_ALPHA) per pair), CutMix on the
    # second (box area ~ Beta(CUTMIX_ALPHA, CUTMIX_ALPHA) per pair). An alpha of 0 turns that
    # mixing off (the other one then pairs every example); both 0: no pairing, one source image
    # per example.
    _C.INPUT.MIXUP_ALPHA = 0.2
    _C.INPUT.CUTMIX_ALPHA = 1.0
    # Applied after label mixing: y <- (1 - s) y + s / NUM_CLASSES.
    _C.INPUT.LABEL_SMOOTHING = 0.1

    _C.SOLVER.OPTIMIZER = "SGD"
    # Learning rate at REFERENCE_BATCH_SIZE images; the run uses
    # BASE_LR * IMS_PER_BATCH / REFERENCE_BATCH_SIZE (0.1 x 4096 / 256 = 1.6 for DeepMind's run).
    # REFERENCE_BATCH_SIZE 0 uses BASE_LR as is.
    _C.SOLVER.BASE_LR = 0.1
    _C.SOLVER.REFERENCE_BATCH_SIZE = 256
    _C.SOLVER.MOMENTUM = 0.9
    _C.SOLVER.NESTEROV = True
    _C.SOLVER.WEIGHT_DECAY = 2e-5
    # Global batch per optimizer step: training examples over all processes and micro-batches
    # (with MixUp/CutMix each example is made of two source images). Each process trains on
    # IMS_PER_BATCH / (ACCUM_STEPS x processes) examples per micro-batch.
    _C.SOLVER.IMS_PER_BATCH = 4096
    # Gradient accumulation: micro-batches per optimizer step (1: none). The accumulated
    # gradient is the global batch's mean gradient; AGC, weight decay, the LR schedule, EMA and
    # checkpoints act per optimizer step, so DeepMind's batch of 4096 fits on fewer devices.
    _C.SOLVER.ACCUM_STEPS = 1
    # Schedule length in epochs of IMS_PER_BATCH training examples per step (DeepMind's
    # definition: with mixing a step reads 2 x IMS_PER_BATCH source images).
    _C.SOLVER.EPOCHS = 360
    # Linear warmup from 0, then cosine decay to 0 at the end of the schedule.
    _C.SOLVER.WARMUP_EPOCHS = 5.0
    # > 0: the schedule has exactly MAX_ITER steps (overrides EPOCHS).
    _C.SOLVER.MAX_ITER = 0
    # > 0: stop (after a checkpoint) once this many steps are done, without changing the
    # schedule; for pre-emptible jobs and interruption tests. Resume with --resume.
    _C.SOLVER.STOP_ITER = 0
    # Periodic checkpoints every this many steps (and at the end of every epoch when
    # CHECKPOINT_EVERY_EPOCH); the newest CHECKPOINT_KEEP are kept.
    _C.SOLVER.CHECKPOINT_PERIOD = 5000
    _C.SOLVER.CHECKPOINT_EVERY_EPOCH = True
    _C.SOLVER.CHECKPOINT_KEEP = 2
    _C.SOLVER.AMP = CN()
    # Mixed precision on GPU ("bfloat16" or "float16"; float16 uses a GradScaler, and AGC, which
    # runs inside optimizer.step(), sees unscaled gradients). CPU runs are always float32.
    _C.SOLVER.AMP.ENABLED = True
    _C.SOLVER.AMP.DTYPE = "bfloat16"
    _C.SOLVER.EMA = CN()
    _C.SOLVER.EMA.ENABLED = True
    # Effective decay at step t: min(DECAY, (1 + t) / (10 + t)) (DeepMind's warmup).
    _C.SOLVER.EMA.DECAY = 0.99999
    # Sharpness-Aware Minimization (docs/sam.md). RHO: radius of the weight perturbation
    # e = RHO * g / ||g|| (||g||: L2 norm of the ascent gradient over every trainable parameter
    # jointly); 0 turns SAM off. The paper fine-tunes with 0.05 and does not give its ImageNet
    # value (docs/reference.md, "SAM").
    _C.SOLVER.SAM = CN()
    _C.SOLVER.SAM.RHO = 0.0
    # Share of the step's own batch the ascent gradient uses (the paper: 20%), in (0, 1]:
    # ceil(ASCENT_FRACTION x n) examples spread evenly over each process's micro-batch of n
    # (MixUp and CutMix examples alike). Each process perturbs its own weights (no all-reduce of
    # the ascent gradient).
    _C.SOLVER.SAM.ASCENT_FRACTION = 0.2

    _C.TEST = CN()
    # Evaluate (raw and EMA weights) every EVAL_PERIOD steps (0: only at the end).
    _C.TEST.EVAL_PERIOD = 0
    # Per-process eval batch size.
    _C.TEST.IMS_PER_BATCH = 100

    _C.EXPORT = CN()
    # The final backbone checkpoint (OUTPUT_DIR/backbone_final.pth) holds the EMA weights when
    # True (and EMA is on), else the raw weights.
    _C.EXPORT.USE_EMA = True

    _C.LOG = CN()
    # Metrics (loss, lr, train top-1, AGC clipped fraction, images/s) every LOG_PERIOD steps to
    # OUTPUT_DIR/metrics.jsonl and TensorBoard (OUTPUT_DIR/tb).
    _C.LOG.PERIOD = 20
    _C.LOG.TENSORBOARD = True
    _C.LOG.PROGRESS_BAR = True


def get_pretrain_cfg() -> CN:
    """A fresh pretraining config with every default (DeepMind's F0 recipe).

    Returns:
        CfgNode: ``MODEL.NFNET.*``, ``SOLVER.AGC.*`` (``nfdet.config``) and the pretraining keys.
    """
    cfg = CN()
    add_nfnet_config(cfg)
    add_pretrain_config(cfg)
    return cfg


def load_pretrain_cfg(config_file: str | None = None, opts: Sequence[str] | None = None) -> CN:
    """The pretraining config from a YAML (a path, or a name under ``configs/``) and ``KEY
    VALUE`` overrides, unfrozen.

    Raises:
        FileNotFoundError: no such config (close names listed).
        ConfigError: an unknown key (closest valid keys suggested), a bad value or an unknown
            variant, naming the file or the command line.
    """
    cfg = get_pretrain_cfg()
    merge_config(cfg, resolve_config_file(config_file) if config_file else None, opts)
    check_pretrain_config(cfg)
    return cfg


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pair(value) -> tuple | None:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return lo, hi


def check_pretrain_config(cfg: CN) -> None:
    """Check the values of the pretraining keys (after merging).

    Raises:
        ConfigError: one line naming the key, its value and what it must be.
    """
    def fail(key: str, value, must: str) -> None:
        raise ConfigError(f"{key} must be {must}, got {value!r}")

    inp, ra, crop = cfg.INPUT, cfg.INPUT.RANDAUGMENT, cfg.INPUT.RANDOM_RESIZED_CROP
    choices = [
        ("DATA.FORMAT", cfg.DATA.FORMAT, ("folder", "filelist", "wds")),
        ("INPUT.TEST_RESIZE", inp.TEST_RESIZE, ("squash", "shorter_side")),
        ("INPUT.INTERPOLATION", inp.INTERPOLATION, ("bicubic", "bilinear", "nearest")),
        ("INPUT.RANDAUGMENT.IMPL", ra.IMPL, ("deepmind", "torchvision")),
        ("INPUT.RANDAUGMENT.CONTRAST_GRAY", ra.CONTRAST_GRAY, ("mean", "pixel_count")),
    ]
    for key, value, allowed in choices:
        if not isinstance(value, str) or value.lower() not in allowed:
            fail(key, value, "one of " + ", ".join(repr(a) for a in allowed))
    for key, value in (("INPUT.TRAIN_SIZE", inp.TRAIN_SIZE), ("INPUT.TEST_SIZE", inp.TEST_SIZE),
                       ("SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH),
                       ("SOLVER.ACCUM_STEPS", cfg.SOLVER.ACCUM_STEPS),
                       ("INPUT.RANDOM_RESIZED_CROP.MAX_ATTEMPTS", crop.MAX_ATTEMPTS)):
        if not isinstance(value, int) or value < 1:
            fail(key, value, "an integer >= 1")
    for key, value in (("INPUT.TEST_RESIZE_PAD", inp.TEST_RESIZE_PAD),
                       ("INPUT.RANDOM_RESIZED_CROP.FALLBACK_PAD", crop.FALLBACK_PAD),
                       ("INPUT.RANDAUGMENT.NUM_OPS", ra.NUM_OPS),
                       ("DATA.WDS.NUM_SAMPLES", cfg.DATA.WDS.NUM_SAMPLES),
                       ("DATA.WDS.SHUFFLE_BUFFER", cfg.DATA.WDS.SHUFFLE_BUFFER)):
        if not isinstance(value, int) or value < 0:
            fail(key, value, "an integer >= 0")
    if not isinstance(cfg.MODEL.HEAD_INIT_STD, (int, float)) or not cfg.MODEL.HEAD_INIT_STD >= 0:
        fail("MODEL.HEAD_INIT_STD", cfg.MODEL.HEAD_INIT_STD, "a number >= 0")
    if not isinstance(ra.MAGNITUDE, (int, float)) or not ra.MAGNITUDE >= 0:
        fail("INPUT.RANDAUGMENT.MAGNITUDE", ra.MAGNITUDE, ">= 0")
    if ra.IMPL.lower() == "torchvision" and not isinstance(ra.MAGNITUDE, int):
        fail("INPUT.RANDAUGMENT.MAGNITUDE", ra.MAGNITUDE, "an integer with IMPL 'torchvision'")
    for key, value in (("INPUT.MIXUP_ALPHA", inp.MIXUP_ALPHA),
                       ("INPUT.CUTMIX_ALPHA", inp.CUTMIX_ALPHA)):
        if not isinstance(value, (int, float)) or not value >= 0:
            fail(key, value, ">= 0 (0 turns it off)")
    if not 0 <= inp.LABEL_SMOOTHING < 1:
        fail("INPUT.LABEL_SMOOTHING", inp.LABEL_SMOOTHING, "in [0, 1)")
    scale = _pair(crop.SCALE)
    if scale is None or not 0 < scale[0] <= scale[1] <= 1:
        fail("INPUT.RANDOM_RESIZED_CROP.SCALE", crop.SCALE, "(min, max) with 0 < min <= max <= 1")
    ratio = _pair(crop.RATIO)
    if ratio is None or not 0 < ratio[0] <= ratio[1]:
        fail("INPUT.RANDOM_RESIZED_CROP.RATIO", crop.RATIO, "(min, max) with 0 < min <= max")
    if not 0 <= crop.MIN_OBJECT_COVERED <= 1:
        fail("INPUT.RANDOM_RESIZED_CROP.MIN_OBJECT_COVERED", crop.MIN_OBJECT_COVERED, "in [0, 1]")
    sam = cfg.SOLVER.SAM
    if not _is_number(sam.RHO) or not 0 <= sam.RHO < math.inf:
        fail("SOLVER.SAM.RHO", sam.RHO, "a finite number >= 0 (0 turns SAM off)")
    if not _is_number(sam.ASCENT_FRACTION) or not 0 < sam.ASCENT_FRACTION <= 1:
        fail("SOLVER.SAM.ASCENT_FRACTION", sam.ASCENT_FRACTION, "a number in (0, 1]")
    if cfg.SOLVER.IMS_PER_BATCH % cfg.SOLVER.ACCUM_STEPS:
        fail("SOLVER.ACCUM_STEPS", cfg.SOLVER.ACCUM_STEPS,
             f"a divisor of SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH})")


def scaled_lr(cfg: CN) -> float:
    """The learning rate the run uses: ``BASE_LR * IMS_PER_BATCH / REFERENCE_BATCH_SIZE``."""
    ref = cfg.SOLVER.REFERENCE_BATCH_SIZE
    if ref <= 0:
        return float(cfg.SOLVER.BASE_LR)
    return float(cfg.SOLVER.BASE_LR) * cfg.SOLVER.IMS_PER_BATCH / ref
