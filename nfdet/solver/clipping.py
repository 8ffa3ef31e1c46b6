"""AGC clipping chosen from the batch size.

DeepMind's clipping ``lambda = 0.01`` is tuned at batch 4096; the paper's ablation (clipping
0.01-0.16, batch 256-4096) needs smaller clipping at larger batch and tolerates larger clipping
at smaller batch. nfdet's rule keeps the fraction of clipped units comparable across batch sizes:
when gradient noise dominates, the norm of a mini-batch gradient grows as ``1 / sqrt(B)``, so

    clipping(B) = clipping_ref * sqrt(B_ref / B)

from a reference point (0.01 at 4096: 0.02 at 1024, 0.04 at 256, 0.113 at 32, 0.16 at 16,
0.45 at 2). The rule spans the paper's sweep 0.01-0.16 from batch 4096 down to 16. See
``docs/small_batch.md`` for the measurements behind it.

Config: ``SOLVER.AGC.REFERENCE_BATCH_SIZE`` (0, the default: ``SOLVER.AGC.CLIPPING`` is used as
given, DeepMind's behaviour) and ``SOLVER.AGC.CLIPPING`` (with a reference batch: the clipping
at that batch).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["clipping_for_batch", "resolve_agc_clipping"]


def clipping_for_batch(batch_size: int, reference_clipping: float = 0.01,
                       reference_batch: int = 4096) -> float:
    """``reference_clipping * sqrt(reference_batch / batch_size)``.

    Args:
        batch_size (int): images per optimizer step (over all devices).
        reference_clipping (float): the clipping at ``reference_batch``.
        reference_batch (int): the batch size the reference clipping is tuned for.

    Raises:
        ValueError: a non-positive argument (named in the message).
    """
    for name, value in (("batch_size", batch_size), ("reference_clipping", reference_clipping),
                        ("reference_batch", reference_batch)):
        if not value > 0:
            raise ValueError(f"clipping_for_batch: {name} must be > 0, got {value!r}")
    return float(reference_clipping) * math.sqrt(float(reference_batch) / float(batch_size))


def resolve_agc_clipping(cfg: Any, batch_size: int) -> Any:
    """A copy of ``cfg`` whose ``SOLVER.AGC.CLIPPING`` is the clipping the run uses.

    With ``SOLVER.AGC.REFERENCE_BATCH_SIZE`` > 0 it is ``clipping_for_batch(batch_size,
    SOLVER.AGC.CLIPPING, SOLVER.AGC.REFERENCE_BATCH_SIZE)`` and the reference batch is set to 0
    in the copy (so resolving twice changes nothing); otherwise ``cfg`` itself is returned.

    Args:
        cfg (CfgNode): a config with ``SOLVER.AGC``.
        batch_size (int): images per optimizer step (e.g. ``SOLVER.IMS_PER_BATCH``).

    Raises:
        ValueError: ``SOLVER.AGC.REFERENCE_BATCH_SIZE`` is negative.
    """
    agc = cfg.SOLVER.get("AGC") if hasattr(cfg.SOLVER, "get") else None
    reference = int(agc.get("REFERENCE_BATCH_SIZE", 0)) if agc is not None else 0
    if reference < 0:
        raise ValueError(f"SOLVER.AGC.REFERENCE_BATCH_SIZE must be >= 0, got {reference}")
    if reference == 0:
        return cfg
    resolved = cfg.clone()
    frozen = resolved.is_frozen()
    resolved.defrost()
    resolved.SOLVER.AGC.CLIPPING = clipping_for_batch(batch_size, float(agc.CLIPPING), reference)
    resolved.SOLVER.AGC.REFERENCE_BATCH_SIZE = 0
    if frozen:
        resolved.freeze()
    return resolved
