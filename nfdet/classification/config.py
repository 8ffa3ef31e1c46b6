"""Config of the NFNet pretraining trainer (``tools/pretrain_net.py``).

The defaults are DeepMind's ImageNet recipe for NFNets (NFNET_REFERENCE.md, "ImageNet training
recipe"); the per-variant values (resolutions, dropout, RandAugment) live in
``configs/pretrain/nfnet_f*_imagenet.yaml``. Solver keys use detectron2's names
(``SOLVER.BASE_LR``, ``MOMENTUM``, ``NESTEROV``, ``WEIGHT_DECAY``, ``IMS_PER_BATCH``,
``CHECKPOINT_PERIOD``), so ``nfdet.solver.build_optimizer`` serves both trainers.
"""

from __future__ import annotations

from collections.abc import Sequence

from fvcore.common.config import CfgNode as CN

from nfdet.config import add_nfnet_config, merge_config, resolve_config_file

__all__ = ["get_pretrain_cfg", "add_pretrain_config", "load_pretrain_cfg", "scaled_lr"]


def add_pretrain_config(cfg: CN) -> None:
    """Add the pretraining keys to ``cfg`` (which already has ``add_nfnet_config``'s keys).

    Args:
        cfg (CfgNode): the config to extend.
    """
    _C = cfg
    _C.OUTPUT_DIR = "./output/pretrain"
    # Base seed; every random stream (sample order, per-image augmentation, MixUp/CutMix, model
    # init, dropout) is derived from it, so a fixed SEED makes a run repeatable. < 0: random.
    _C.SEED = 0
    # cuDNN deterministic algorithms (slower); CPU runs are deterministic anyway.
    _C.CUDNN_DETERMINISTIC = False

    _C.MODEL.NUM_CLASSES = 1000
    # Dropout before the classifier (per variant: F0 0.2 ... F4-F7 0.5).
    _C.MODEL.DROPOUT = 0.2
    # Stochastic depth (DeepMind's NFNet config: 0.25).
    _C.MODEL.NFNET.DROP_PATH_RATE = 0.25
    # Optional initial weights: an nfdet checkpoint ({"model": classifier state dict}) or a
    # pretraining checkpoint. A classifier of another size is skipped with a warning.
    _C.MODEL.WEIGHTS = ""
    # Train in torch.channels_last memory format (faster convs with AMP on recent GPUs).
    _C.MODEL.CHANNELS_LAST = False

    _C.DATA = CN()
    # "folder": ROOT/<TRAIN_SPLIT>/<class>/<image> (ImageNet layout; classes sorted by name).
    # "filelist": a text file of "relative/path label" lines (ROOT-relative paths, integer
    # labels), read once; for datasets a folder walk cannot serve quickly.
    _C.DATA.FORMAT = "folder"
    _C.DATA.ROOT = "datasets/imagenet"
    # A folder under ROOT ("folder") or a file list path, absolute or relative to ROOT
    # ("filelist").
    _C.DATA.TRAIN_SPLIT = "train"
    _C.DATA.VAL_SPLIT = "val"
    # Data loader worker processes per training process (0: load in the main process).
    _C.DATA.NUM_WORKERS = 8
    _C.DATA.PREFETCH_FACTOR = 4
    # RGB normalization on the 0-255 scale (ImageNet statistics x 255).
    _C.DATA.PIXEL_MEAN = [123.675, 116.28, 103.53]
    _C.DATA.PIXEL_STD = [58.395, 57.12, 57.375]

    _C.INPUT = CN()
    # Square train crop and eval crop (per variant: F0 192/256 ... F7 480/608).
    _C.INPUT.TRAIN_SIZE = 192
    _C.INPUT.TEST_SIZE = 256
    # Eval: resize the shorter side to TEST_SIZE + TEST_RESIZE_PAD, then center crop TEST_SIZE.
    _C.INPUT.TEST_RESIZE_PAD = 32
    _C.INPUT.INTERPOLATION = "bicubic"
    _C.INPUT.RANDOM_RESIZED_CROP = CN()
    _C.INPUT.RANDOM_RESIZED_CROP.SCALE = (0.08, 1.0)
    _C.INPUT.RANDOM_RESIZED_CROP.RATIO = (3.0 / 4.0, 4.0 / 3.0)
    _C.INPUT.HFLIP = True
    _C.INPUT.RANDAUGMENT = CN()
    _C.INPUT.RANDAUGMENT.ENABLED = True
    # DeepMind's (layers, magnitude); MAGNITUDE on DeepMind's 0-10 scale, where 10 is the
    # maximum of torchvision's ranges and larger values extrapolate (see transforms.py).
    _C.INPUT.RANDAUGMENT.NUM_OPS = 4
    _C.INPUT.RANDAUGMENT.MAGNITUDE = 5
    # Batch mixing: MixUp on one half of every batch, CutMix on the other (DeepMind's recipe).
    # An alpha of 0 disables that half's mixing.
    _C.INPUT.MIXUP_ALPHA = 0.2
    _C.INPUT.CUTMIX_ALPHA = 1.0
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
    # Global batch over all processes (split evenly; must be divisible by the world size).
    _C.SOLVER.IMS_PER_BATCH = 4096
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
    return merge_config(cfg, resolve_config_file(config_file) if config_file else None, opts)


def scaled_lr(cfg: CN) -> float:
    """The learning rate the run uses: ``BASE_LR * IMS_PER_BATCH / REFERENCE_BATCH_SIZE``."""
    ref = cfg.SOLVER.REFERENCE_BATCH_SIZE
    if ref <= 0:
        return float(cfg.SOLVER.BASE_LR)
    return float(cfg.SOLVER.BASE_LR) * cfg.SOLVER.IMS_PER_BATCH / ref
