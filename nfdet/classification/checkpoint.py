"""Training checkpoints of the pretraining trainer and the backbone export.

Layout of ``OUTPUT_DIR``:

- ``model_<step:07d>.pth``: full training state, written atomically (temporary file, fsync,
  rename; ``nfdet.checkpoint.io.atomic_write``: a process killed even inside a save leaves
  the previous checkpoint and ``last_checkpoint`` intact) by
  process 0 every ``SOLVER.CHECKPOINT_PERIOD`` steps, at epoch ends and at the end; the newest
  ``SOLVER.CHECKPOINT_KEEP`` are kept. ``model_final.pth`` is the state after the last step.
- ``last_checkpoint``: a one-line text file naming the newest complete checkpoint (also replaced
  atomically, after the checkpoint itself is in place), as detectron2's checkpointer does.
- ``backbone_final.pth``: the nfdet checkpoint format (``{"model": classifier state dict with
  trunk.*/head.* keys, "meta": {...}}``), EMA weights by default; ``tools/train_net.py`` takes it
  as ``MODEL.WEIGHTS``.

A training checkpoint holds only tensors and plain Python values (``torch.load(...,
weights_only=True)`` reads it)::

    {"model": state dict, "optimizer": state dict, "ema": {"model", "num_updates", "decay"} | None,
     "grad_scaler": state dict | None, "step": int (optimizer steps), "epoch": int,
     "step_in_epoch": int, "steps_per_epoch": int, "steps_per_pass": int (optimizer steps per
     pass over the data), "world_size": int, "seed": int (the run's seed, drawn when SEED < 0),
     "rng": [per-rank {"torch": ByteTensor, "cuda": [ByteTensor], "numpy": (str, LongTensor, int,
             int, float), "python": tuple}],
     "meta": {"variant", "num_classes", "config" (YAML text)}}
"""

from __future__ import annotations

import logging
import os
import random
import re
from typing import Any

import numpy as np
import torch

from ..checkpoint import (
    CheckpointFormatError,
    load_torch_checkpoint,
    save_checkpoint,
    write_text_atomic,
)

__all__ = [
    "get_rng_state",
    "set_rng_state",
    "save_training_checkpoint",
    "find_last_checkpoint",
    "load_checkpoint_file",
    "list_checkpoints",
    "state_dict_mismatch",
]

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^model_(\d{7})\.pth$")
LAST_CHECKPOINT = "last_checkpoint"


def get_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and Python, as tensors and plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "python": random.getstate(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(output_dir: str, checkpoint: dict, step: int, keep: int,
                             final: bool = False) -> str:
    """Write a checkpoint atomically, point ``last_checkpoint`` at it, prune old ones.

    Args:
        output_dir (str): the run's folder.
        checkpoint (dict): the state to save.
        step (int): steps done (names the file).
        keep (int): how many periodic checkpoints to keep (>= 1).
        final (bool): write ``model_final.pth`` instead of a numbered file.

    Returns:
        str: the path written.
    """
    name = "model_final.pth" if final else f"model_{step:07d}.pth"
    path = os.path.join(output_dir, name)
    save_checkpoint(checkpoint, path)
    # The pointer moves only once the checkpoint is complete on disk; older checkpoints are
    # removed only after that.
    write_text_atomic(os.path.join(output_dir, LAST_CHECKPOINT), name)
    numbered = sorted(n for n in os.listdir(output_dir) if _CKPT_RE.match(n))
    for old in numbered[: max(len(numbered) - max(keep, 1), 0)]:
        if old != name:
            os.remove(os.path.join(output_dir, old))
    return path


def list_checkpoints(output_dir: str) -> list[str]:
    """The complete checkpoints of ``output_dir`` (numbered ones by step, then the final one)."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(n for n in os.listdir(output_dir) if _CKPT_RE.match(n))
    if os.path.isfile(os.path.join(output_dir, "model_final.pth")):
        names.append("model_final.pth")
    return [os.path.join(output_dir, n) for n in names]


def find_last_checkpoint(output_dir: str) -> str | None:
    """The checkpoint ``last_checkpoint`` names, or None when there is none."""
    pointer = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{pointer} names {name!r}, which does not exist in {output_dir}")
    return path


def load_checkpoint_file(path: str) -> dict:
    """Read an nfdet checkpoint on CPU with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointFormatError: empty, truncated, corrupted (a failing CRC32 of the zip archive),
            unreadable, or not an nfdet checkpoint; the message names the file.
    """
    ckpt = load_torch_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointFormatError(
            f"{path}: not an nfdet checkpoint (expected a dict with a 'model' state dict)"
        )
    return ckpt


def state_dict_mismatch(own: dict[str, torch.Tensor], loaded: dict[str, Any],
                        ignore: tuple[str, ...] = ()) -> str:
    """Describe how ``loaded`` fails to fit ``own``, one line per key (at most 20 of each kind):
    keys whose shapes differ (both shapes), missing keys, unexpected keys. Empty when it fits.

    Args:
        own (dict): the model's state dict.
        loaded (dict): the checkpoint's.
        ignore (tuple[str]): keys allowed to be missing or of another shape.
    """
    missing = [k for k in own if k not in loaded and k not in ignore]
    unexpected = [k for k in loaded if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in loaded and k not in ignore and isinstance(loaded[k], torch.Tensor)
        and loaded[k].shape != own[k].shape
    ]
    lines = []
    for title, items in (("shape mismatch", shapes), ("missing", missing),
                         ("unexpected", unexpected)):
        lines += [f"{title}: {item}" for item in items[:20]]
        if len(items) > 20:
            lines.append(f"... {len(items) - 20} more {title} keys")
    return "\n  ".join(lines)
