"""Weight import: DeepMind Haiku and timm ``dm_nfnet_f*`` NFNet weights -> nfdet checkpoints;
checked checkpoint reading and crash-safe (atomic) writing shared by both trainers."""

from .convert import (
    CheckpointFormatError,
    atomic_write,
    convert_deepmind_params,
    convert_timm_state_dict,
    convert_weights,
    detect_format,
    infer_variant,
    load_source,
    load_torch_checkpoint,
    save_checkpoint,
    write_text_atomic,
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
    "load_torch_checkpoint",
    "atomic_write",
    "write_text_atomic",
]
