"""Optimization: Adaptive Gradient Clipping, the optimizer builder shared by every trainer, and
Sharpness-Aware Minimization's perturbation (used by the pretraining trainer)."""

from .agc import AGCOptimizerMixin, clip_grad_agc_, get_agc_stats, with_agc
from .build import NO_DECAY_PATTERNS, OPTIMIZERS, build_optimizer, build_param_groups
from .sam import SAMPerturbation, ascent_indices, ascent_size, sam_perturb_, sam_restore_

__all__ = [
    "AGCOptimizerMixin",
    "clip_grad_agc_",
    "get_agc_stats",
    "with_agc",
    "NO_DECAY_PATTERNS",
    "OPTIMIZERS",
    "build_optimizer",
    "build_param_groups",
    "SAMPerturbation",
    "ascent_size",
    "ascent_indices",
    "sam_perturb_",
    "sam_restore_",
]
