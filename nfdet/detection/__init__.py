"""detectron2 integration: NFNet backbones (+FPN), checkpoint loading, trainer, CLI helpers.

Everything in nfdet that imports detectron2 lives here. Importing this package registers
``build_nfnet_backbone`` and ``build_nfnet_fpn_backbone`` in detectron2's ``BACKBONE_REGISTRY``.
"""

from .backbone import NFNetBackbone, build_nfnet_backbone, build_nfnet_fpn_backbone
from .checkpoint import NFNetCheckpointer, find_trunk_prefix, is_classification_checkpoint
from .config import get_nfdet_cfg
from .trainer import AGCStatsHook, NFNetTrainer

__all__ = [
    "NFNetBackbone",
    "build_nfnet_backbone",
    "build_nfnet_fpn_backbone",
    "NFNetCheckpointer",
    "find_trunk_prefix",
    "is_classification_checkpoint",
    "get_nfdet_cfg",
    "AGCStatsHook",
    "NFNetTrainer",
]
