"""What a weight file holds: reading a source file (DeepMind dill pickle, timm or nfdet
``torch.save`` file) and naming its format; then, for the converters, the nfdet variant that
converted tensors belong to (inferred from their shapes) and the check that they fit it.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..modeling import NFNET_VARIANTS, NFNetSpec, build_nfnet, canonical_name
from .io import CheckpointFormatError, load_torch_checkpoint

__all__ = [
    "detect_format",
    "load_source",
    "infer_variant",
    "as_tensor",
    "fit_to_variant",
]

# torch.save's legacy (non-zip) format starts with this pickled magic number.
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


# ----------------------------------------------------------------------------------------------
# Reading source files and naming their format
# ----------------------------------------------------------------------------------------------


def load_source(path: str) -> tuple[str, Mapping]:
    """Read a DeepMind file or a timm/nfdet ``torch.save`` file.

    ``torch.save`` files are read with ``weights_only=True``. DeepMind's ``*_haiku.npz`` files
    are dill pickles: like any pickle they can run code when loaded, so only read trusted files.

    Args:
        path (str): the file.

    Returns:
        (format, params): format is "deepmind", "timm" or "nfdet"; params the (unwrapped) dict.

    Raises:
        FileNotFoundError: no such file.
        ImportError: a DeepMind file and ``dill`` is not installed.
        CheckpointFormatError: the file is of no known format (the message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such weight file: {path}")
    obj = _read_any(path)
    try:
        fmt = detect_format(obj)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{path}: {e}") from None
    return fmt, _unwrap(obj)


def _read_any(path: str) -> Any:
    """Load ``path`` as a ``torch.save`` file (zip or legacy) or as a dill pickle, by its first
    bytes."""
    with open(path, "rb") as f:
        head = f.read(2)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointFormatError(
                f"{path}: a zip archive that is not a torch.save file (entries: {names[:5]}...); "
                "expected a DeepMind NFNet dill pickle or a timm/nfdet torch checkpoint"
            )
        return load_torch_checkpoint(path)
    if head == b"PK":
        raise CheckpointFormatError(
            f"{path}: a damaged zip archive (truncated or corrupted torch.save file?): its "
            "central directory cannot be read"
        )
    if head[:1] == b"\x80" and _is_legacy_torch_file(path):
        return load_torch_checkpoint(path)
    if head[:1] == b"\x80":
        return _load_dill(path)  # a plain pickle stream: DeepMind's files are dill pickles
    raise CheckpointFormatError(
        f"{path}: unrecognized file (neither a pickle nor a torch.save archive); expected a "
        "DeepMind NFNet dill pickle (*_haiku.npz) or a timm/nfdet torch checkpoint"
    )


class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global, so reading a file's first object runs no code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"global {module}.{name} refused")


def _is_legacy_torch_file(path: str) -> bool:
    """Whether the first pickled object is torch's magic number (safe: no globals loaded)."""
    try:
        with open(path, "rb") as f:
            first = _NoGlobalsUnpickler(f).load()
    except Exception:
        return False
    return isinstance(first, int) and first == _LEGACY_TORCH_MAGIC


def _load_dill(path: str) -> Any:
    try:
        dill = importlib.import_module("dill")
    except ImportError as e:
        raise ImportError(
            "Reading DeepMind's released NFNet files (dill pickles) needs the 'dill' package: "
            "`pip install dill` or `pip install nfdet[deepmind]`."
        ) from e
    try:
        with open(path, "rb") as f:
            return dill.load(f)
    except Exception as e:
        raise CheckpointFormatError(f"{path}: cannot unpickle the file ({e})") from e


def detect_format(obj: Any) -> str:
    """Name the format of a loaded object: "deepmind", "timm" or "nfdet".

    Raises:
        CheckpointFormatError: when it is none of them.
    """
    obj = _unwrap(obj)
    if _is_deepmind_tree(obj):
        return "deepmind"
    if _is_timm_state_dict(obj):
        return "timm"
    if _is_nfdet_state_dict(obj):
        return "nfdet"
    raise CheckpointFormatError("not a DeepMind NFNet param tree, timm state dict or nfdet model")


def _is_deepmind_tree(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(
        isinstance(k, str) and "/~/" in k and isinstance(v, Mapping) for k, v in obj.items()
    )


def _is_timm_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and re.match(r"^(module\.)?stages\.\d+\.\d+\.conv1\.weight$", k)
        for k in obj
    )


def _is_nfdet_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and k.startswith("trunk.") for k in obj
    )


def _unwrap(obj: Any) -> Any:
    """Strip the usual training-checkpoint wrappers around a state dict."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "params"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and (
                _is_timm_state_dict(inner)
                or _is_deepmind_tree(inner)
                or _is_nfdet_state_dict(inner)
            ):
                return inner
    return obj


# ----------------------------------------------------------------------------------------------
# The variant of converted tensors, and the check that they fit it
# ----------------------------------------------------------------------------------------------


def infer_variant(signature: tuple) -> str:
    """Find the variant whose architecture has the given signature.

    Args:
        signature (tuple): (depths, widths, stem widths incl. output, bottleneck widths,
            groups per stage, final conv width), as read from a state dict.

    Raises:
        CheckpointFormatError: no variant matches (the message shows what was found).
    """
    for name, spec in NFNET_VARIANTS.items():
        if _spec_signature(spec) == signature:
            return name
    depths, widths, stem, mids, groups, feats = signature
    raise CheckpointFormatError(
        f"No nfdet variant matches the weights (depths={list(depths)}, widths={list(widths)}, "
        f"stem={list(stem)}, bottleneck={list(mids)}, groups={list(groups)}, "
        f"final_conv={feats}); variants: {', '.join(NFNET_VARIANTS)}"
    )


def _spec_signature(spec: NFNetSpec) -> tuple:
    return (
        tuple(spec.depths),
        tuple(spec.widths),
        spec.stem_conv_widths,
        tuple(spec.bottleneck_width(w) for w in spec.widths),
        tuple(spec.conv_groups(w) for w in spec.widths),
        spec.num_features if spec.final_multiplier else 0,
    )


def _state_dict_signature(sd: Mapping[str, torch.Tensor]) -> tuple:
    """``infer_variant``'s signature of an nfdet classifier state dict, read from its shapes."""
    depths, widths, mids, groups = [], [], [], []
    s = 0
    while f"trunk.stages.{s}.0.conv1.weight" in sd:
        b = 0
        while f"trunk.stages.{s}.{b}.conv1.weight" in sd:
            b += 1
        depths.append(b)
        widths.append(sd[f"trunk.stages.{s}.0.conv3.weight"].shape[0])
        w2 = sd[f"trunk.stages.{s}.0.conv2.weight"]
        mids.append(w2.shape[0])
        groups.append(w2.shape[0] // w2.shape[1])
        s += 1
    stem = tuple(sd[f"trunk.stem.conv{i}.weight"].shape[0] for i in range(1, 5)
                 if f"trunk.stem.conv{i}.weight" in sd)
    feats = sd["trunk.final_conv.weight"].shape[0] if "trunk.final_conv.weight" in sd else 0
    return tuple(depths), tuple(widths), stem, tuple(mids), tuple(groups), feats


def as_tensor(value: Any, key: str) -> torch.Tensor:
    """A CPU tensor copy of a tensor or numeric array (half-precision arrays widened to float32).

    Raises:
        CheckpointFormatError: ``value`` is not a numeric array (``key`` names it).
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    try:
        arr = np.asarray(value)
    except Exception as e:
        raise CheckpointFormatError(f"{key}: not an array ({type(value).__name__})") from e
    if arr.dtype.kind not in "fiub":
        raise CheckpointFormatError(f"{key}: not a numeric array (dtype {arr.dtype})")
    if arr.dtype.kind == "f" and arr.dtype != np.float64 and arr.dtype.itemsize < 4:
        # bfloat16 / float16 arrays from JAX: widen before handing to torch.
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr)).clone()


def fit_to_variant(
    sd: dict[str, torch.Tensor],
    variant: str | None,
    source: str,
    source_keys: Mapping[str, str],
) -> tuple[dict[str, torch.Tensor], str, int]:
    """Check ``sd`` (nfdet names) against ``build_nfnet(variant)`` and return it in that model's
    key order, float tensors as float32.

    Tensors whose shape differs from the model's only by unit dimensions (gains, SE weights
    stored as 1x1 convs) are reshaped.

    Args:
        sd (dict): converted tensors by nfdet name.
        variant (str | None): the nfdet variant; inferred from the shapes when None.
        source (str): how to name the source in error messages.
        source_keys (Mapping): nfdet name -> the source's name, for error messages.

    Returns:
        (state_dict, variant, num_classes).

    Raises:
        CheckpointFormatError: no classifier weight, no matching variant, missing or unexpected
            keys (source names), or a shape that does not fit.
    """
    if "head.fc.weight" not in sd:
        raise CheckpointFormatError(f"{source}: no classifier weight (head.fc / linear) found")
    num_classes = int(sd["head.fc.weight"].shape[0])
    # Read even when the variant is given (as before the module split); a tree that lacks a
    # stage's conv weights therefore stops here with a KeyError, not a CheckpointFormatError.
    found = _state_dict_signature(sd)
    variant = infer_variant(found) if variant is None else canonical_name(variant)
    with torch.device("meta"):
        reference = build_nfnet(variant, num_classes=num_classes).state_dict()
    missing = [k for k in reference if k not in sd]
    unexpected = [source_keys.get(k, k) for k in sd if k not in reference]
    if missing or unexpected:
        raise CheckpointFormatError(
            f"{source}: weights do not fit nfdet variant {variant!r}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    out = {}
    for key, ref in reference.items():
        value = sd[key]
        if tuple(value.shape) != tuple(ref.shape):
            if value.numel() == ref.numel() and _same_up_to_unit_dims(value.shape, ref.shape):
                value = value.reshape(ref.shape)
            else:
                raise CheckpointFormatError(
                    f"{source}: shape mismatch for {source_keys.get(key, key)} -> {key}: "
                    f"got {tuple(value.shape)}, variant {variant!r} expects {tuple(ref.shape)}"
                )
        if value.is_floating_point() or ref.is_floating_point():
            value = value.to(torch.float32)
        out[key] = value.contiguous()
    return out, variant, num_classes


def _same_up_to_unit_dims(a: torch.Size, b: torch.Size) -> bool:
    return [d for d in a if d != 1] == [d for d in b if d != 1]
