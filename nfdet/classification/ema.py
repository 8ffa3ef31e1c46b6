"""Exponential moving average of model weights (DeepMind's NFNet recipe)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """An fp32 copy of a model whose parameters and buffers track ``ema = d * ema + (1 - d) * w``.

    The decay warms up as DeepMind's: ``d = min(decay, (1 + step) / (10 + step))``, where ``step``
    counts the updates done so far, so early averages are not dominated by the random init.

    Args:
        model (nn.Module): the model to track (unwrapped, not DDP).
        decay (float): the final decay.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99999):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update will use."""
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into the average."""
        d = self.current_decay()
        ema = [t for t in self._tensors(self.module) if t.is_floating_point()]
        new = [t for t in self._tensors(model) if t.is_floating_point()]
        torch._foreach_lerp_(ema, [t.to(e.dtype) for t, e in zip(new, ema)], 1.0 - d)
        self.num_updates += 1

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        # detach() (not .data) shares the version counter, so in-place EMA updates invalidate the
        # eval weight cache of ScaledStdConv2d.
        return [p.detach() for p in model.parameters()] + list(model.buffers())

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "num_updates": self.num_updates,
                "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
