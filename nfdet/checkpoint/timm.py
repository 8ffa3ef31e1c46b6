"""timm ``dm_nfnet_f*`` state dicts -> nfdet names (the name table is in ``nfdet.checkpoint``).

timm's keys already follow nfdet's layout (``stem.*``, ``stages.S.B.*``, ``final_conv.*``,
``head.fc.*``); inside a block three modules and the skip gain are named differently.

timm's ``nf_resnet*`` models are not DeepMind's NF-ResNets (average-pool shortcuts, symmetric
padding, no skip gains, gamma in the stem conv): they do not convert (docs/nf_resnet.md lists
which keys correspond and what differs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .formats import as_tensor, fit_to_variant
from .io import CheckpointFormatError

__all__ = ["convert_timm_state_dict"]

# timm module name -> nfdet module name inside a block.
_TIMM_BLOCK_RENAMES = (
    ("downsample.conv.", "shortcut."),
    ("attn_last.fc1.", "se.fc1."),
    ("attn_last.fc2.", "se.fc2."),
)
_TIMM_SKIP_GAIN = "skipinit_gain"


def convert_timm_state_dict(
    state_dict: Mapping[str, Any], variant: str | None = None, source: str = "timm state dict"
) -> tuple[dict[str, torch.Tensor], str, int]:
    """Convert a timm ``dm_nfnet_f*`` state dict to nfdet names.

    Args:
        state_dict (Mapping): timm keys (``stem.conv1.weight``, ``stages.0.0.conv1.gain``, ...);
            a ``module.`` prefix is ignored.
        variant (str | None): the nfdet variant; inferred from the shapes when None.
        source (str): how to name the source in error messages.

    Returns:
        (state_dict, variant, num_classes).

    Raises:
        CheckpointFormatError: unknown keys, shape mismatches, no matching variant, or a timm
            NFNet that is not DeepMind-compatible (no ``skipinit_gain``: timm's own ``nfnet_f*``).
    """
    sd: dict[str, torch.Tensor] = {}
    source_keys: dict[str, str] = {}
    has_skip_gains = False
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        has_skip_gains |= _is_skip_gain(name)
        new = _nfdet_name(name)
        sd[new] = as_tensor(value, key)
        source_keys[new] = key
    if not has_skip_gains:
        raise CheckpointFormatError(
            f"{source}: no '{_TIMM_SKIP_GAIN}' parameters: only timm's DeepMind-compatible "
            "dm_nfnet_f* models (SAME padding, gamma in the activation, skip gains) convert"
        )
    return fit_to_variant(sd, variant, source, source_keys)


def _is_skip_gain(name: str) -> bool:
    return name.startswith("stages.") and name.endswith("." + _TIMM_SKIP_GAIN)


def _nfdet_name(name: str) -> str:
    """The nfdet name of a timm key (an unknown key is kept as it is: ``fit_to_variant`` reports
    it as unexpected)."""
    if name.startswith(("stem.", "final_conv.")):
        return "trunk." + name
    if name.startswith("stages."):
        new = "trunk." + name
        for old, repl in _TIMM_BLOCK_RENAMES:
            new = new.replace("." + old, "." + repl)
        if _is_skip_gain(name):
            new = new[: -len(_TIMM_SKIP_GAIN)] + "skip_gain"
        return new
    return name  # head.fc.* already has its nfdet name
