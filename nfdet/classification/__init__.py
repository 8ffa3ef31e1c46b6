"""NFNet classification pretraining: DeepMind's ImageNet recipe with AGC, EMA, MixUp/CutMix.

``import nfdet.classification`` needs no detectron2; only multi-process ``launch`` imports it.
"""

from .checkpoint import find_last_checkpoint, load_checkpoint_file
from .config import add_pretrain_config, get_pretrain_cfg, scaled_lr
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
from .transforms import DeepMindRandAugment, build_test_transform, build_train_transform, mix_batch

__all__ = [
    "add_pretrain_config",
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
    "DeepMindRandAugment",
    "build_test_transform",
    "build_train_transform",
    "mix_batch",
    "find_last_checkpoint",
    "load_checkpoint_file",
]
