"""Weight import: DeepMind Haiku and timm ``dm_nfnet_f*`` NFNet weights -> nfdet checkpoints."""

from .convert import (
    CheckpointFormatError,
    convert_deepmind_params,
    convert_timm_state_dict,
    convert_weights,
    detect_format,
    infer_variant,
    load_source,
    save_checkpoint,
)

__all__ = [
    "CheckpointFormatError",
    "convert_deepmind_params",
    "convert_timm_state_dict",
    "convert_weights",
    "detect_format",
    "infer_variant",
    "load_source",
    "save_checkpoint",
]
