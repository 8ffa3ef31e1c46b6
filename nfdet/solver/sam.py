"""Sharpness-Aware Minimization (SAM; Foret et al. 2021), as the NFNet paper uses it.

One SAM step (docs/sam.md):

1. the *ascent* gradient ``g`` of the training loss, on a fraction of the step's own batch
   (``ascent_indices``: spread evenly over the batch), computed by each process on its own
   examples;
2. the weights move to ``w + e`` with ``e = rho * g / (||g|| + tiny)``, ``||g||`` the L2 norm over
   every perturbed tensor jointly (Foret et al., Algorithm 1) (``sam_perturb_``);
3. the *descent* gradient on the whole batch at ``w + e``;
4. the weights go back to ``w`` exactly (``sam_restore_``), and the optimizer steps from ``w`` with
   the descent gradient (AGC, weight decay and momentum as in a plain step).

This module holds the arithmetic of steps 2 and 4; the trainer runs the passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["SAMPerturbation", "ascent_size", "ascent_indices", "sam_perturb_", "sam_restore_"]

# Added to ||g|| in the denominator: a zero gradient gives e = 0 instead of 0 / 0.
_NORM_TINY = 1e-12
# ceil(fraction * n) is taken of the product rounded to this many decimals, so that float
# noise (0.3 * 10 = 3.0000000000000004) does not round a whole number up.
_ROUND_DECIMALS = 9


class SAMPerturbation(NamedTuple):
    """What ``sam_perturb_`` did, for ``sam_restore_`` and for logging.

    Attributes:
        params (list[Tensor]): the perturbed parameters, in order.
        originals (list[Tensor]): their values before the perturbation (copies).
        grad_norm (Tensor): 0-dim float32, ``||g||`` of the (unscaled) ascent gradient over all
            perturbed tensors; not finite if the gradient was not (then ``e`` was 0).
    """

    params: list[torch.Tensor]
    originals: list[torch.Tensor]
    grad_norm: torch.Tensor


def ascent_size(n: int, fraction: float) -> int:
    """How many examples of a batch of ``n`` the ascent gradient uses: ``ceil(fraction * n)``
    (the product rounded to 9 decimals first), at least 1 and at most ``n``.

    Args:
        n (int): examples in the (micro-)batch, >= 1.
        fraction (float): the share of the batch, in (0, 1].
    """
    return min(n, max(1, math.ceil(round(fraction * n, _ROUND_DECIMALS))))


def ascent_indices(n: int, fraction: float) -> torch.Tensor:
    """Positions in a batch of ``n`` of the examples the ascent gradient uses: ``m =
    ascent_size(n, fraction)`` positions spread evenly, ``floor(j * n / m)`` for ``j < m``.

    Spread, not the first ``m``: a mixed batch holds its MixUp examples first and its CutMix
    examples second, and the ascent should see both. When ``fraction * n`` is a whole number,
    the positions in a batch of ``k n`` are those of ``k`` consecutive batches of ``n``, so
    gradient accumulation picks the same examples as one big batch.

    Args:
        n (int): examples in the (micro-)batch, >= 1.
        fraction (float): the share of the batch, in (0, 1].

    Returns:
        Tensor: (m,) int64 positions, increasing, the first 0.
    """
    m = ascent_size(n, fraction)
    return torch.div(torch.arange(m) * n, m, rounding_mode="floor")


@torch.no_grad()
def sam_perturb_(params: Sequence[torch.Tensor], rho: float,
                 grad_scale: torch.Tensor | None = None,
                 zero_if_nonfinite: bool = False) -> SAMPerturbation:
    """Move every parameter that has a gradient to ``p + e``, ``e = rho * g / (||g|| + tiny)``.

    ``g`` is ``p.grad / grad_scale``: a GradScaler's scale (float16 AMP) is divided out before the
    norm, so it never reaches ``e``. The norm is computed in float32 over all tensors jointly.
    The gradients are overwritten (each ``p.grad`` holds ``e`` afterwards): zero them before the
    descent pass.

    Args:
        params (sequence[Tensor]): candidate parameters; those without ``.grad`` are left alone.
        rho (float): the radius of the perturbation, > 0.
        grad_scale (Tensor | None): 0-dim factor the gradients carry (None: 1).
        zero_if_nonfinite (bool): if ``||g||`` is not finite (an overflowing float16 backward),
            use ``e = 0`` instead of letting NaN reach the weights; decided on the device, without
            a sync.

    Returns:
        SAMPerturbation: the parameters, their original values and ``||g||``.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        raise ValueError("SAM: no parameter has an ascent gradient")
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    grad_norm = torch.linalg.vector_norm(torch.stack(norms))
    # e = rho * (g_scaled / scale) / (||g_scaled|| / scale + tiny) = g_scaled * factor
    if grad_scale is not None:
        grad_norm = grad_norm / grad_scale.float()
    factor = rho / (grad_norm + _NORM_TINY)
    if grad_scale is not None:
        factor = factor / grad_scale.float()
    if zero_if_nonfinite:
        factor = torch.where(torch.isfinite(grad_norm), factor, torch.zeros_like(factor))
        for g in grads:  # inf * 0 would be NaN: make every entry finite first
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    originals = [p.detach().clone() for p in params]
    # The gradients become e in place (no copy of the model's size); the caller drops them.
    torch._foreach_mul_(grads, factor.to(grads[0].dtype))
    torch._foreach_add_([p.detach() for p in params], grads)
    return SAMPerturbation(params, originals, grad_norm)


@torch.no_grad()
def sam_restore_(perturbation: SAMPerturbation) -> None:
    """Put the perturbed parameters back to their values before ``sam_perturb_`` (bit-exact)."""
    for p, original in zip(perturbation.params, perturbation.originals):
        p.detach().copy_(original)
