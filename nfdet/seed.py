"""Seeding of the global random number generators, for both trainers."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_all"]


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (torch: the CPU and every GPU).

    Args:
        seed (int): the seed; numpy takes it modulo 2**32 (its seeds are 32-bit).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
