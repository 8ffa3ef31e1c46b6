"""DeepMind Haiku NFNet param trees -> nfdet names and PyTorch layouts (the name table is in
``nfdet.checkpoint``).

A Haiku tree is ``{module_path: {param_name: array}}`` with paths ``<root>/~/<module>``, e.g.
``NFNet/~/nf_block_3/~/conv1b``. DeepMind numbers blocks globally (``nf_block_<i>`` over all
stages); a stage starts at each block that owns a ``conv_shortcut``. Conv weights are HWIO,
linear weights in x out, gains vectors (docs/reference.md, "Released weights").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .formats import as_tensor, fit_to_variant
from .io import CheckpointFormatError

__all__ = ["convert_deepmind_params"]

# DeepMind module name -> nfdet module name inside a block.
_DM_BLOCK_CONVS = {
    "conv0": "conv1",
    "conv1": "conv2",
    "conv1b": "conv2b",
    "conv2": "conv3",
    "conv_shortcut": "shortcut",
}
_DM_SE = {"linear": "fc1", "linear_1": "fc2"}
# DeepMind param name -> nfdet param name, per kind of module.
_DM_CONV_PARAMS = {"w": "weight", "b": "bias", "gain": "gain"}
_DM_LINEAR_PARAMS = {"w": "weight", "b": "bias"}
_DM_BLOCK_PARAMS = {"skip_gain": "skip_gain"}

_DM_PATH = re.compile(r"^[^/]+/~/(?P<rest>.+)$")
_DM_BLOCK = re.compile(r"^nf_block_(?P<idx>\d+)(?:/~/(?P<sub>.+))?$")
_DM_STEM = re.compile(r"^stem_conv(\d)$")

_Leaves = Mapping[str, Any]


def convert_deepmind_params(
    params: Mapping[str, _Leaves],
    variant: str | None = None,
    source: str = "DeepMind params",
) -> tuple[dict[str, torch.Tensor], str, int]:
    """Convert a DeepMind Haiku NFNet param tree to nfdet names and PyTorch layouts.

    Args:
        params (Mapping): ``{module_path: {param_name: array}}``, e.g.
            ``params["NFNet/~/nf_block_3/~/conv1b"]["w"]`` (HWIO).
        variant (str | None): the nfdet variant; inferred from the shapes when None.
        source (str): how to name the source in error messages.

    Returns:
        (state_dict, variant, num_classes).

    Raises:
        CheckpointFormatError: unknown module paths or params, shape mismatches, no matching
            variant.
    """
    blocks, others = _split_blocks(params, source)
    positions = _block_positions(blocks, source)
    root = next(iter(params)).split("/~/", 1)[0]
    tensors = _ConvertedTensors(source)
    for rest, leaves in others.items():
        _convert_outer_module(tensors, f"{root}/~/{rest}", rest, leaves)
    for i, subs in blocks.items():
        stage, index = positions[i]
        for sub, leaves in subs.items():
            path = f"{root}/~/nf_block_{i}" + (f"/~/{sub}" if sub else "")
            _convert_block_module(tensors, f"trunk.stages.{stage}.{index}", path, sub, leaves)
    return fit_to_variant(tensors.state_dict, variant, source, tensors.source_keys)


def _split_blocks(
    params: Mapping[str, _Leaves], source: str
) -> tuple[dict[int, dict[str, _Leaves]], dict[str, _Leaves]]:
    """Group the module paths: ``{block index: {sub-module ('' for the block): leaves}}`` and
    ``{other module: leaves}`` (paths without the root).

    Raises:
        CheckpointFormatError: a path that is not ``<root>/~/...``, or blocks not numbered
            0..N-1.
    """
    blocks: dict[int, dict[str, _Leaves]] = {}
    others: dict[str, _Leaves] = {}
    for path, leaves in params.items():
        m = _DM_PATH.match(path)
        if m is None:
            raise CheckpointFormatError(f"{source}: unexpected module path {path!r}")
        rest = m.group("rest")
        bm = _DM_BLOCK.match(rest)
        if bm:
            blocks.setdefault(int(bm.group("idx")), {})[bm.group("sub") or ""] = leaves
        else:
            others[rest] = leaves
    if sorted(blocks) != list(range(len(blocks))):
        raise CheckpointFormatError(
            f"{source}: NFNet blocks are not numbered 0..N-1 (found {sorted(blocks)[:10]}...)"
        )
    return blocks, others


def _block_positions(blocks: Mapping[int, Mapping[str, _Leaves]], source: str
                     ) -> dict[int, tuple[int, int]]:
    """(stage, index in the stage) of every block: a stage starts at each ``conv_shortcut``.

    Raises:
        CheckpointFormatError: block 0 has no shortcut.
    """
    positions: dict[int, tuple[int, int]] = {}
    stage, index = -1, 0
    for i in range(len(blocks)):
        if "conv_shortcut" in blocks[i]:
            stage, index = stage + 1, 0
        if stage < 0:
            raise CheckpointFormatError(
                f"{source}: nf_block_0 has no conv_shortcut; cannot find the stage boundaries"
            )
        positions[i] = (stage, index)
        index += 1
    return positions


class _ConvertedTensors:
    """The converted state dict being filled, and the DeepMind name of each entry.

    Args:
        source (str): how to name the source in error messages.
    """

    def __init__(self, source: str):
        self.source = source
        self.state_dict: dict[str, torch.Tensor] = {}
        self.source_keys: dict[str, str] = {}

    def add_module(self, prefix: str, path: str, leaves: _Leaves, kind: str,
                   names: Mapping[str, str]) -> None:
        """Add the params of module ``path`` under ``prefix``, in PyTorch layout.

        Args:
            prefix (str): the nfdet module name.
            path (str): the DeepMind module path.
            leaves (Mapping): its params.
            kind (str): "conv" (HWIO -> OIHW), "linear" (in x out -> out x in) or "block".
            names (Mapping): DeepMind param name -> nfdet param name; any other is an error.
        """
        for pname, value in leaves.items():
            if pname not in names:
                raise CheckpointFormatError(f"{self.source}: unexpected param {path}/{pname}")
            key = f"{path}/{pname}"
            t = as_tensor(value, key)
            if kind == "conv" and t.ndim == 4:
                t = t.permute(3, 2, 0, 1)  # HWIO -> OIHW
            elif kind == "linear" and t.ndim == 2:
                t = t.t()  # in x out -> out x in
            new = f"{prefix}.{names[pname]}"
            self.state_dict[new] = t.contiguous()
            self.source_keys[new] = key

    def unexpected(self, path: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self.source}: unexpected module path {path!r}")


def _convert_outer_module(tensors: _ConvertedTensors, path: str, rest: str,
                          leaves: _Leaves) -> None:
    """A module outside the blocks: the stem convs, the final conv or the classifier."""
    stem = _DM_STEM.match(rest)
    if stem and int(stem.group(1)) < 4:
        prefix = f"trunk.stem.conv{int(stem.group(1)) + 1}"
        tensors.add_module(prefix, path, leaves, "conv", _DM_CONV_PARAMS)
    elif rest == "final_conv":
        tensors.add_module("trunk.final_conv", path, leaves, "conv", _DM_CONV_PARAMS)
    elif rest == "linear":
        tensors.add_module("head.fc", path, leaves, "linear", _DM_LINEAR_PARAMS)
    else:
        raise tensors.unexpected(path)


def _convert_block_module(tensors: _ConvertedTensors, prefix: str, path: str, sub: str,
                          leaves: _Leaves) -> None:
    """A block's own params (``sub`` empty: the skip gain), one of its convs, or an SE linear."""
    se = sub.split("/~/", 1)[1] if sub.startswith("squeeze_excite/~/") else None
    if sub == "":
        tensors.add_module(prefix, path, leaves, "block", _DM_BLOCK_PARAMS)
    elif sub in _DM_BLOCK_CONVS:
        tensors.add_module(f"{prefix}.{_DM_BLOCK_CONVS[sub]}", path, leaves, "conv",
                           _DM_CONV_PARAMS)
    elif se in _DM_SE:
        tensors.add_module(f"{prefix}.se.{_DM_SE[se]}", path, leaves, "linear",
                           _DM_LINEAR_PARAMS)
    else:
        raise tensors.unexpected(path)
