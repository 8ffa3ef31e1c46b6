"""detectron2 configs with nfdet's keys."""

from __future__ import annotations

from detectron2.config import CfgNode, get_cfg

from ..config import add_nfnet_config

__all__ = ["get_nfdet_cfg"]


def get_nfdet_cfg() -> CfgNode:
    """detectron2's default config plus ``MODEL.NFNET.*`` and ``SOLVER.AGC.*``.

    Returns:
        CfgNode: a mutable config, ready for ``merge_from_file`` of nfdet's YAMLs.
    """
    cfg = get_cfg()
    add_nfnet_config(cfg)
    return cfg
