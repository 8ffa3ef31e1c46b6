"""``convert_weights``, the logic of ``tools/convert_weights.py``: a DeepMind or timm NFNet weight
file in, an nfdet checkpoint out (format detected, variant inferred, written atomically)."""

from __future__ import annotations

import os

from .deepmind import convert_deepmind_params
from .formats import as_tensor, fit_to_variant, load_source
from .io import save_checkpoint
from .timm import convert_timm_state_dict

__all__ = ["convert_weights"]


def convert_weights(src: str, out: str | None = None, variant: str | None = None) -> dict:
    """Convert a DeepMind or timm NFNet weight file into an nfdet checkpoint.

    The source format is detected from the file; the variant is inferred from the shapes unless
    given (then the shapes must fit it).

    Args:
        src (str): DeepMind ``F*_haiku.npz`` (dill pickle), or a ``torch.save``d timm
            ``dm_nfnet_f*`` state dict (a ``{"state_dict": ...}`` wrapper is accepted).
        out (str | None): where to write the checkpoint (atomically); nothing written if None.
        variant (str | None): nfdet variant name ("F0", "dm_nfnet_f0", ...).

    Returns:
        dict: the checkpoint ``{"model": state_dict, "meta": {...}}``.
    """
    fmt, params = load_source(src)
    name = f"{src} ({fmt} format)"
    if fmt == "deepmind":
        sd, variant, num_classes = convert_deepmind_params(params, variant, source=name)
    elif fmt == "timm":
        sd, variant, num_classes = convert_timm_state_dict(params, variant, source=name)
    else:
        tensors = {k: as_tensor(v, k) for k, v in params.items()}
        sd, variant, num_classes = fit_to_variant(tensors, variant, name, {})
    checkpoint = {
        "model": sd,
        "meta": {
            "variant": variant,
            "num_classes": num_classes,
            "source": fmt,
            "source_file": os.path.basename(os.fspath(src)),
        },
    }
    if out is not None:
        save_checkpoint(checkpoint, out)
    return checkpoint
