"""Checkpoint files: checked reading and crash-safe writing shared by both trainers (``io``), and
the import of released NFNet weights, DeepMind Haiku files (``deepmind``) and timm
``dm_nfnet_f*`` state dicts (``timm``), into nfdet checkpoints (``formats`` reads a source file and
names its format; ``convert`` is the converter's entry point).

The nfdet checkpoint format is a ``torch.save``d dict ``{"model": {name: tensor}, "meta": {...}}``:
``model`` is the state dict of ``build_nfnet(variant, num_classes)`` (keys ``trunk.*`` and
``head.*``, plain tensors only) and ``meta`` holds plain Python values (``variant``,
``num_classes``, ``source``, ``source_file``), so ``torch.load(..., weights_only=True)`` reads it.

Name mapping (nfdet <- DeepMind <- timm), per block ``trunk.stages.S.B``:

==============  ============================  ==========================
nfdet           DeepMind (``nf_block_<i>``)   timm (``stages.S.B``)
==============  ============================  ==========================
conv1           conv0                         conv1
conv2           conv1                         conv2
conv2b          conv1b                        conv2b
conv3           conv2                         conv3
shortcut        conv_shortcut                 downsample.conv
se.fc1 / fc2    squeeze_excite/~/linear(_1)   attn_last.fc1 / fc2 (1x1)
skip_gain       skip_gain                     skipinit_gain
==============  ============================  ==========================
"""

from .convert import convert_weights
from .deepmind import convert_deepmind_params
from .formats import detect_format, infer_variant, load_source
from .io import (
    CheckpointFormatError,
    atomic_write,
    load_torch_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from .timm import convert_timm_state_dict

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
