"""Checkpointing for NFNet detectors: nfdet classification checkpoints load as ``MODEL.WEIGHTS``.

An nfdet classification checkpoint (``{"model": {"trunk.*", "head.*"}, "meta": {...}}``, written
by ``nfdet.checkpoint`` or the pretraining trainer) is recognised by its keys and renamed onto the
detector's NFNet backbone by a fixed prefix (``trunk.`` -> ``backbone.bottom_up.trunk.`` under an
FPN, ``backbone.trunk.`` without). Every other checkpoint (detectron2's ``model_final.pth``,
``last_checkpoint`` resumes, model-zoo files) loads exactly as with ``DetectionCheckpointer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from .backbone import NFNetBackbone

__all__ = ["NFNetCheckpointer", "is_classification_checkpoint", "find_trunk_prefix"]

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


class NFNetCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also loads nfdet classification checkpoints.

    For a classification checkpoint, ``trunk.*`` is renamed to the model's trunk prefix and
    ``head.*`` is kept as is, so the usual report of incompatible keys names the classifier head
    (and the final conv when ``res5`` is not the final conv, or stages the detector does not
    build) as unused, parameters missing from the checkpoint (the detection heads, FPN) as
    missing, and shape mismatches (a checkpoint of another variant) by name. A summary is logged
    as well; the last report is kept in ``last_incompatible`` (missing_keys, unexpected_keys,
    incorrect_shapes) for programmatic checks.
    """

    last_incompatible = None

    def _load_model(self, checkpoint: dict[str, Any]):
        state_dict = checkpoint.get("model")
        if isinstance(state_dict, Mapping) and is_classification_checkpoint(state_dict):
            prefix = find_trunk_prefix(self.model)
            meta = checkpoint.get("meta")
            checkpoint["model"] = self._rename_classifier(state_dict, prefix, meta)
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
        if missing or mismatched:
            self.logger.warning(
                "Backbone tensors NOT loaded from the classification checkpoint (another variant "
                f"or architecture?): missing {sorted(missing)}; shape mismatch {sorted(mismatched)}"
            )
