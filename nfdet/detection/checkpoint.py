"""Checkpointing for NFNet detectors: nfdet classification checkpoints load as ``MODEL.WEIGHTS``;
checkpoints are written atomically; wrong-variant, truncated and corrupted files are errors.

An nfdet classification checkpoint (``{"model": {"trunk.*", "head.*"}, "meta": {...}}``, written
by ``nfdet.checkpoint`` or the pretraining trainer) is recognised by its keys and renamed onto the
detector's NFNet backbone by a fixed prefix (``trunk.`` -> ``backbone.bottom_up.trunk.`` under an
FPN, ``backbone.trunk.`` without). Every other checkpoint (detectron2's ``model_final.pth``,
``last_checkpoint`` resumes, model-zoo files) loads as with ``DetectionCheckpointer``, with two
differences:

- the NFNet trunk must fit: a trunk tensor of another shape, a trunk tensor missing, or an extra
  block in a stage the detector builds (i.e. another NFNet variant) raises ``ValueError`` naming
  the file and every mismatching key with both shapes (detectron2 only warns and skips them).
  Other shape mismatches (e.g. a box predictor for another number of classes) are skipped with
  a warning as usual;
- a ``torch.save`` file is checked to be complete and intact (zip central directory and CRC32
  checksums) before it is read, so a truncated or corrupted file raises
  ``CheckpointFormatError`` naming it.

``save`` writes to a temporary file in ``OUTPUT_DIR``, fsyncs it and renames it into place, then
replaces ``last_checkpoint`` the same way, so a process killed at any moment (even inside a
save) leaves ``last_checkpoint`` naming a complete checkpoint. It refuses to write non-finite
weights (``FloatingPointError``), so a diverged run never replaces a good checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..checkpoint import load_torch_checkpoint, save_checkpoint, write_text_atomic
from .backbone import NFNetBackbone

__all__ = [
    "NFNetCheckpointer",
    "is_classification_checkpoint",
    "find_trunk_prefix",
    "trunk_mismatch",
]

_CLASSIFIER_PREFIXES = ("trunk.", "head.")


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def is_classification_checkpoint(state_dict: Mapping[str, Any]) -> bool:
    """True for the state dict of an nfdet classifier: every key ``trunk.*`` or ``head.*``."""
    keys = [_strip_module(k) for k in state_dict if isinstance(k, str)]
    return (
        len(keys) == len(state_dict)
        and any(k.startswith("trunk.") for k in keys)
        and all(k.startswith(_CLASSIFIER_PREFIXES) for k in keys)
    )


def find_trunk_prefix(model: nn.Module) -> str:
    """State-dict prefix of the NFNet trunk in ``model`` (e.g. ``backbone.bottom_up.trunk.``).

    Raises:
        ValueError: when ``model`` holds no ``NFNetBackbone`` or more than one.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, NFNetBackbone)]
    if len(names) != 1:
        raise ValueError(
            "An nfdet classification checkpoint needs a model with exactly one NFNet backbone "
            f"(MODEL.BACKBONE.NAME build_nfnet_backbone / build_nfnet_fpn_backbone); found "
            f"{len(names)}{': ' + ', '.join(names) if names else ''}"
        )
    return (names[0] + "." if names[0] else "") + "trunk."


def _nfnet_trunk(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(state-dict prefix, trunk module) of the model's only NFNet backbone, else None."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, NFNetBackbone)]
    if len(found) != 1:
        return None
    name, backbone = found[0]
    return (name + "." if name else "") + "trunk.", backbone.trunk


def trunk_mismatch(model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """How ``state_dict`` (detector key names) fails to fit the NFNet trunk of ``model``.

    Checked only when the state dict has tensors for the trunk at all (another backbone's
    weights are then reported as one line). Tensors of stages (or the final conv) that the
    detector does not build are fine; an extra block inside a built stage is not.

    Args:
        model (nn.Module): a detector (DDP-unwrapped) with one NFNet backbone.
        state_dict (Mapping): checkpoint tensors by detector key.

    Returns:
        list[str]: one line per problem (key, both shapes); empty when the trunk fits or the
        model has no NFNet backbone.
    """
    found = _nfnet_trunk(model)
    if found is None:
        return []
    prefix, trunk = found
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    theirs = {
        _strip_module(k): v for k, v in state_dict.items()
        if isinstance(k, str) and _strip_module(k).startswith(prefix)
    }
    if not theirs:
        return [f"no tensor for the NFNet backbone ({prefix}*): weights of another architecture?"]
    built = {name for name, _ in trunk.named_modules()} - {"", "stages"}
    problems = []
    for key, value in own.items():
        if key not in theirs:
            problems.append(f"{key}: missing from the checkpoint (model {tuple(value.shape)})")
        elif tuple(getattr(theirs[key], "shape", ())) != tuple(value.shape):
            problems.append(
                f"{key}: checkpoint {tuple(getattr(theirs[key], 'shape', ()))} vs model "
                f"{tuple(value.shape)}"
            )
    for key, value in theirs.items():
        if key in own:
            continue
        parts = key[len(prefix):].split(".")[:-1]
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if ancestors & built:
            problems.append(
                f"{key}: in the checkpoint {tuple(getattr(value, 'shape', ()))} but not in the "
                "model (a deeper variant?)"
            )
    return problems


class NFNetCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also loads nfdet classification checkpoints.

    For a classification checkpoint, ``trunk.*`` is renamed to the model's trunk prefix and
    ``head.*`` is kept as is, so the usual report of incompatible keys names the classifier head
    (and the final conv when ``res5`` is not the final conv, or stages the detector does not
    build) as unused and parameters missing from the checkpoint (the detection heads, FPN) as
    missing. A summary is logged as well; the last report is kept in ``last_incompatible``
    (missing_keys, unexpected_keys, incorrect_shapes) for programmatic checks.

    For any checkpoint, a trunk that does not fit (``trunk_mismatch``: another variant) raises
    ``ValueError`` before anything is loaded; a damaged file raises ``CheckpointFormatError``.
    ``save`` is atomic and refuses non-finite weights (see the module docstring).
    """

    last_incompatible = None
    # The checkpoint this checkpointer last wrote or resumed from ("" if none): named when
    # training diverges.
    last_good_checkpoint = ""
    _loading = ""

    # ------------------------------------------------------------------------------- loading
    def load(self, path: str, *args, **kwargs) -> dict[str, Any]:
        self._loading = path
        try:
            ret = super().load(path, *args, **kwargs)
        finally:
            self._parsed_url_during_load = None  # detectron2 leaves it set after an error
            self._loading = ""
        checkpointables = args[0] if args else kwargs.get("checkpointables")
        if path and checkpointables is None:  # a full load: the training state resumes here
            self.last_good_checkpoint = path
        return ret

    def _torch_load(self, f: str) -> Any:
        # Checks that the file is complete and intact (CRC32) first; errors name the file.
        return load_torch_checkpoint(f)

    def _check_trunk(self, checkpoint: dict[str, Any]) -> None:
        problems = trunk_mismatch(self.model, checkpoint["model"])
        if problems:
            meta = checkpoint.get("meta")
            note = ""
            if isinstance(meta, Mapping) and meta.get("variant"):
                note = f" (the checkpoint says variant {meta['variant']})"
            shown = problems[:20] + ([f"... {len(problems) - 20} more"] if len(problems) > 20
                                     else [])
            raise ValueError(
                f"{self._loading or 'checkpoint'}{note} does not fit the model's NFNet backbone "
                f"(MODEL.NFNET.VARIANT): another variant? {len(problems)} mismatching keys:\n  "
                + "\n  ".join(shown)
            )

    def _load_model(self, checkpoint: dict[str, Any]):
        state_dict = checkpoint.get("model")
        if isinstance(state_dict, Mapping) and is_classification_checkpoint(state_dict):
            prefix = find_trunk_prefix(self.model)
            meta = checkpoint.get("meta")
            checkpoint["model"] = self._rename_classifier(state_dict, prefix, meta)
            self._check_trunk(checkpoint)
            incompatible = super()._load_model(checkpoint)
            # Unused keys are reported under their names in the checkpoint (trunk.final_conv.*).
            incompatible = incompatible._replace(
                unexpected_keys=[
                    "trunk." + k[len(prefix):] if k.startswith(prefix) else k
                    for k in incompatible.unexpected_keys
                ]
            )
            self._log_backbone_summary(incompatible, prefix)
        else:
            if isinstance(state_dict, Mapping):
                self._check_trunk(checkpoint)
            incompatible = super()._load_model(checkpoint)
        self.last_incompatible = incompatible
        return incompatible

    def _rename_classifier(
        self, state_dict: Mapping[str, Any], prefix: str, meta: Any
    ) -> dict[str, Any]:
        info = ""
        if isinstance(meta, Mapping) and meta:
            info = " (" + ", ".join(f"{k}={meta[k]}" for k in sorted(meta) if k != "args") + ")"
        self.logger.info(
            f"Reading an nfdet classification checkpoint{info}: trunk.* -> {prefix}*"
        )
        renamed = {}
        for key, value in state_dict.items():
            key = _strip_module(key)
            if key.startswith("trunk."):
                key = prefix + key[len("trunk."):]
            renamed[key] = value
        return renamed

    def _log_backbone_summary(self, incompatible, prefix: str) -> None:
        trunk_keys = [k for k in self.model.state_dict() if k.startswith(prefix)]
        missing = [k for k in incompatible.missing_keys if k.startswith(prefix)]
        mismatched = [k for k, *_ in incompatible.incorrect_shapes]
        loaded = len(trunk_keys) - len(missing) - len(
            [k for k in mismatched if k.startswith(prefix)]
        )
        self.logger.info(
            f"Loaded {loaded}/{len(trunk_keys)} backbone tensors from the classification "
            f"checkpoint; unused checkpoint keys: {sorted(incompatible.unexpected_keys) or 'none'}"
        )

    # -------------------------------------------------------------------------------- saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``OUTPUT_DIR/<name>.pth`` atomically, then point ``last_checkpoint`` at it.

        Same content as detectron2's ``Checkpointer.save`` (model, checkpointables, ``kwargs``).

        Raises:
            FloatingPointError: the model holds NaN or infinite values (nothing is written).
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        bad = [k for k, v in data["model"].items()
               if isinstance(v, torch.Tensor) and v.is_floating_point()
               and not bool(torch.isfinite(v).all())]
        if bad:
            at = f" at iteration {kwargs['iteration']}" if "iteration" in kwargs else ""
            last = self.last_good_checkpoint or "none (this run has not saved or resumed one)"
            raise FloatingPointError(
                f"Training diverged: the weights are NaN or infinite{at} ({len(bad)} tensors, "
                f"e.g. {bad[:3]}); {name}.pth NOT written. Last good checkpoint: {last}"
            )
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        save_checkpoint(data, save_file)
        self.tag_last_checkpoint(basename)
        self.last_good_checkpoint = save_file

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Replace ``last_checkpoint`` atomically (only ever after the checkpoint is complete)."""
        write_text_atomic(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)
