"""Training checkpoints of the pretraining trainer and the backbone export.

Layout of ``OUTPUT_DIR``:

- ``model_<step:07d>.pth``: full training state, written atomically (temporary file + rename) by
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
     "grad_scaler": state dict | None, "step": int, "epoch": int, "step_in_epoch": int,
     "steps_per_epoch": int, "world_size": int,
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

from nfdet.checkpoint import save_checkpoint

__all__ = [
    "get_rng_state",
    "set_rng_state",
    "save_training_checkpoint",
    "find_last_checkpoint",
    "load_checkpoint_file",
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
    # The pointer moves only once the checkpoint is complete on disk.
    tmp = os.path.join(output_dir, f".{LAST_CHECKPOINT}.tmp")
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(output_dir, LAST_CHECKPOINT))
    numbered = sorted(n for n in os.listdir(output_dir) if _CKPT_RE.match(n))
    for old in numbered[: max(len(numbered) - max(keep, 1), 0)]:
        if old != name:
            os.remove(os.path.join(output_dir, old))
    return path


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
    """``torch.load`` a checkpoint on CPU with ``weights_only=True``, with a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"Cannot read checkpoint {path!r}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"Checkpoint {path!r} is not an nfdet checkpoint (no 'model' entry)")
    return ckpt
