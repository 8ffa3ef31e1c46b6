"""Optimization: Adaptive Gradient Clipping and the optimizer builder shared by every trainer."""

from .agc import AGCOptimizerMixin, clip_grad_agc_, get_agc_stats, with_agc
from .build import NO_DECAY_PATTERNS, OPTIMIZERS, build_optimizer, build_param_groups

__all__ = [
    "AGCOptimizerMixin",
    "clip_grad_agc_",
    "get_agc_stats",
    "with_agc",
    "NO_DECAY_PATTERNS",
    "OPTIMIZERS",
    "build_optimizer",
    "build_param_groups",
]
