"""The one registry of NFNet nonlinearities.

Every entry holds what any part of nfdet needs to know about an activation: its gamma (the
signal-propagation constant), the plain function, the same function written into a given
tensor (the fused CPU path's form for reused buffers) and the oneDNN post-op that computes it
inside a convolution. An unknown name raises an error naming it: there is no default entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "ACTIVATION_GAMMA", "Activation", "get_activation"]


@dataclass(frozen=True)
class Activation:
    """One nonlinearity of the registry.

    Args:
        name (str): the registry key.
        gamma (float): the gain such that ``fn(x) * gamma`` has unit variance for
            ``x ~ N(0, 1)`` (docs/reference.md, "Architecture").
        fn (callable): the nonlinearity alone, ``Tensor -> Tensor`` (no gamma).
        fn_out (callable): ``fn_out(x, out)`` writes ``fn(x)`` into ``out`` and returns it.
        onednn (tuple[str, str]): ``(attr, algorithm)`` of the oneDNN post-op computing ``fn``
            inside ``torch.ops.mkldnn._convolution_pointwise``.
    """

    name: str
    gamma: float
    fn: Callable[[torch.Tensor], torch.Tensor]
    fn_out: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    onednn: tuple[str, str]


def _relu_out(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.clamp_min(x, 0.0, out=out)


def _gelu_out(x: torch.Tensor, out: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return torch.ops.aten.gelu.out(x, approximate=approximate, out=out)


def _silu_out(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu.out(x, out=out)


# The gammas are DeepMind's constants (the relu one is empirical, not sqrt(2 / (1 - 1/pi))).
# "gelu" is exact, as in timm's port of the released weights; "gelu_tanh" is jax.nn.gelu's
# default, which DeepMind trained with. functools.partial (not lambdas): entries pickle.
_ENTRIES = (
    Activation("gelu", 1.7015043497085571, F.gelu, _gelu_out, ("gelu", "none")),
    Activation("gelu_tanh", 1.7015043497085571, functools.partial(F.gelu, approximate="tanh"),
               functools.partial(_gelu_out, approximate="tanh"), ("gelu", "tanh")),
    Activation("relu", 1.7139588594436646, F.relu, _relu_out, ("relu", "")),
    Activation("silu", 1.7881293296813965, F.silu, _silu_out, ("swish", "")),
)

ACTIVATIONS: Mapping[str, Activation] = MappingProxyType({a.name: a for a in _ENTRIES})

# A read-only view of the registry's gammas (for code that only needs the constant).
ACTIVATION_GAMMA: Mapping[str, float] = MappingProxyType({a.name: a.gamma for a in _ENTRIES})


def get_activation(name: str) -> Activation:
    """The registry entry of ``name``.

    Raises:
        ValueError: ``name`` is not in the registry (the message names it and the valid ones).
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}"
        ) from None
