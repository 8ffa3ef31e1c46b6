"""NFNet classification pretraining: DeepMind's ImageNet recipe with AGC, EMA, MixUp/CutMix and
RandAugment, in DeepMind's pipeline order (docs/pretraining_pipeline.md).

``import nfdet.classification`` needs no detectron2; only multi-process ``launch`` imports it.
"""

from .checkpoint import find_last_checkpoint, load_checkpoint_file
from .config import add_pretrain_config, check_pretrain_config, get_pretrain_cfg, scaled_lr
from .data import (
    ClassificationDataset,
    EpochBatchSampler,
    build_dataset,
    read_file_list,
    scan_image_folder,
    write_file_list,
)
from .ema import ModelEMA
from .engine import PretrainTrainer, build_pretrain_model, evaluate, export_backbone, lr_factor
from .launch import launch, launch_from_args, main, pretrain_argument_parser, resolve_config_file
from .mixing import MixedBatch, mix_pairs, mixed_targets
from .randaugment import RandAugment, TorchvisionRandAugment
from .transforms import build_test_transform, build_train_collate, build_train_transform

__all__ = [
    "add_pretrain_config",
    "check_pretrain_config",
    "get_pretrain_cfg",
    "scaled_lr",
    "ClassificationDataset",
    "EpochBatchSampler",
    "build_dataset",
    "read_file_list",
    "scan_image_folder",
    "write_file_list",
    "ModelEMA",
    "PretrainTrainer",
    "build_pretrain_model",
    "evaluate",
    "export_backbone",
    "lr_factor",
    "launch",
    "launch_from_args",
    "main",
    "pretrain_argument_parser",
    "resolve_config_file",
    "MixedBatch",
    "mix_pairs",
    "mixed_targets",
    "RandAugment",
    "TorchvisionRandAugment",
    "build_test_transform",
    "build_train_collate",
    "build_train_transform",
    "find_last_checkpoint",
    "load_checkpoint_file",
]
